"""Feature encoding and scaling, identical in the trainer and the consumer.

The encoded space is ``[scaled numeric features | one-hot categorical attributes]``. Numeric
features are (optionally) ``log1p``-transformed, then centred and scaled with parameters fitted
by the trainer and shipped in the model bundle. One-hot columns hold 0 or
``categorical_weight``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from sklearn.preprocessing import RobustScaler, StandardScaler

from segmentation.events import CustomerEvent

OTHER = "other"


class FeatureSpec(BaseModel):
    """How raw events become model inputs: part of every model bundle."""

    model_config = ConfigDict(frozen=True)

    numeric: list[str] = Field(min_length=1)
    log_features: list[str] = Field(default_factory=list)
    vocabulary: dict[str, list[str]] = Field(
        default_factory=dict, description="attribute -> values, each list ends with 'other'"
    )
    scaler: Literal["standard", "robust"] = "standard"
    center: list[float]
    scale: list[float]
    categorical_weight: float = Field(
        1.0, gt=0, description="value of a set one-hot column (distance between two categories "
        "is weight x sqrt(2) scaled units)"
    )

    @property
    def columns(self) -> list[str]:
        """Names of the encoded columns.

        >>> FeatureSpec(numeric=["x"], vocabulary={"ch": ["app", "other"]},
        ...             center=[0.0], scale=[1.0]).columns
        ['x', 'ch=app', 'ch=other']
        """
        return self.numeric + [f"{a}={v}" for a, vs in self.vocabulary.items() for v in vs]

    @property
    def n_numeric(self) -> int:
        return len(self.numeric)

    def encode(self, events: Sequence[CustomerEvent]) -> tuple[np.ndarray, int]:
        """Encode events; returns the matrix and how many category values were unknown."""
        raw = raw_numeric(events, self.numeric)
        scaled = scale(log_transform(raw, self.log_mask()), self.center, self.scale)
        onehot, unknown = one_hot(events, self.vocabulary, self.categorical_weight)
        return np.hstack([scaled, onehot]), unknown

    def log_mask(self) -> np.ndarray:
        return np.array([name in self.log_features for name in self.numeric], dtype=bool)

    def to_raw_numeric(self, encoded: np.ndarray) -> np.ndarray:
        """Undo scaling (and log1p) of the numeric columns: back to the events' units."""
        numeric = encoded[:, : self.n_numeric] * np.asarray(self.scale) + np.asarray(self.center)
        mask = self.log_mask()
        numeric[:, mask] = np.expm1(numeric[:, mask])
        return numeric

    def reencode(self, encoded: np.ndarray, source: FeatureSpec) -> np.ndarray:
        """Express points encoded with ``source`` in this spec's space (numeric part rescaled,
        one-hot columns realigned by name; columns this spec does not know are dropped)."""
        numeric = source.to_raw_numeric(encoded)
        by_name = dict(zip(source.numeric, numeric.T, strict=True))
        raw = np.column_stack([by_name[n] for n in self.numeric])
        scaled = scale(log_transform(raw, self.log_mask()), self.center, self.scale)
        src_cols = {c: i for i, c in enumerate(source.columns)}
        onehot_cols = self.columns[self.n_numeric :]
        onehot = np.zeros((encoded.shape[0], len(onehot_cols)))
        for j, col in enumerate(onehot_cols):
            if col in src_cols:
                onehot[:, j] = encoded[:, src_cols[col]] / source.categorical_weight
        onehot *= self.categorical_weight
        return np.hstack([scaled, onehot])


def raw_numeric(events: Sequence[CustomerEvent], names: Sequence[str]) -> np.ndarray:
    """Numeric features as a float matrix, one row per event, columns in ``names`` order.

    >>> e = CustomerEvent(customer_id="c", event_time=0, features={"a": 1, "b": 2.5})
    >>> raw_numeric([e, e], ["b", "a"]).tolist()
    [[2.5, 1.0], [2.5, 1.0]]
    """
    out = np.empty((len(events), len(names)), dtype=np.float64)
    for i, event in enumerate(events):
        f = event.features
        out[i] = [f[n] for n in names]
    return out


def log_transform(raw: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``log1p`` of the masked columns (negative values are clipped to 0 first).

    >>> log_transform(np.array([[np.e - 1, 5.0]]), np.array([True, False])).round(6).tolist()
    [[1.0, 5.0]]
    """
    if not mask.any():
        return raw
    out = raw.copy()
    out[:, mask] = np.log1p(np.clip(out[:, mask], 0, None))
    return out


def fit_scaler(
    x: np.ndarray, kind: Literal["standard", "robust"]
) -> tuple[list[float], list[float]]:
    """Fit centre and scale per column; constant columns get scale 1 (sklearn's convention).

    >>> fit_scaler(np.array([[1.0, 5.0], [3.0, 5.0]]), "standard")
    ([2.0, 5.0], [1.0, 1.0])
    """
    if kind == "robust":
        robust = RobustScaler().fit(x)
        return robust.center_.tolist(), robust.scale_.tolist()
    standard = StandardScaler().fit(x)
    return standard.mean_.tolist(), standard.scale_.tolist()


def scale(x: np.ndarray, center: Sequence[float], scale_: Sequence[float]) -> np.ndarray:
    """``(x - center) / scale``.

    >>> scale(np.array([[3.0]]), [1.0], [2.0]).tolist()
    [[1.0]]
    """
    return (x - np.asarray(center)) / np.asarray(scale_)


def fit_vocabulary(
    events: Iterable[CustomerEvent], attributes: Sequence[str], min_count: int = 1,
    max_values: int | None = None,
) -> dict[str, list[str]]:
    """Per attribute, the ``max_values`` most frequent values seen at least ``min_count`` times
    (sorted), plus ``other`` for everything else: a high-cardinality attribute cannot widen
    the model without bound.

    >>> e = [CustomerEvent(customer_id="c", event_time=0, features={}, attributes={"ch": v})
    ...      for v in ("web", "app", "web", "tv", "tv", "tv")]
    >>> fit_vocabulary(e, ["ch"])
    {'ch': ['app', 'tv', 'web', 'other']}
    >>> fit_vocabulary(e, ["ch"], min_count=2, max_values=1)
    {'ch': ['tv', 'other']}
    """
    counts: dict[str, Counter[str]] = {a: Counter() for a in attributes}
    for event in events:
        for a in attributes:
            value = event.attributes.get(a)
            if value is not None and value != OTHER:
                counts[a][value] += 1
    vocabulary = {}
    for a in attributes:
        # most_common orders ties by first appearance; sort ties by value for determinism
        ranked = sorted(counts[a].items(), key=lambda vn: (-vn[1], vn[0]))[:max_values]
        vocabulary[a] = sorted(v for v, n in ranked if n >= min_count) + [OTHER]
    return vocabulary


def one_hot(
    events: Sequence[CustomerEvent], vocabulary: dict[str, list[str]], weight: float = 1.0
) -> tuple[np.ndarray, int]:
    """One-hot columns for each attribute; unknown or absent values go to ``other``. A set
    column holds ``weight``: categories should shape segments, not split every segment.

    >>> e = CustomerEvent(customer_id="c", event_time=0, features={}, attributes={"ch": "tv"})
    >>> m, unknown = one_hot([e], {"ch": ["app", "other"]})
    >>> m.tolist(), unknown
    ([[0.0, 1.0]], 1)
    """
    width = sum(len(vs) for vs in vocabulary.values())
    out = np.zeros((len(events), width), dtype=np.float64)
    unknown = 0
    offset = 0
    for attribute, values in vocabulary.items():
        index = {v: i for i, v in enumerate(values)}
        other = index[OTHER]
        for row, event in enumerate(events):
            col = index.get(event.attributes.get(attribute, OTHER))
            if col is None:
                unknown += 1
                col = other
            out[row, offset + col] = weight
        offset += len(values)
    return out, unknown


def fit_spec(
    events: Sequence[CustomerEvent],
    numeric: Sequence[str],
    categorical: Sequence[str],
    kind: Literal["standard", "robust"],
    log_features: Sequence[str] = (),
    categorical_weight: float = 1.0,
    vocabulary_min_count: int = 1,
    vocabulary_max: int | None = None,
) -> FeatureSpec:
    """Fit the vocabulary and the scaler on a training window."""
    mask = np.array([n in log_features for n in numeric], dtype=bool)
    center, scale_ = fit_scaler(log_transform(raw_numeric(events, numeric), mask), kind)
    return FeatureSpec(
        numeric=list(numeric),
        log_features=list(log_features),
        vocabulary=fit_vocabulary(events, categorical, vocabulary_min_count, vocabulary_max),
        scaler=kind,
        center=center,
        scale=scale_,
        categorical_weight=categorical_weight,
    )
