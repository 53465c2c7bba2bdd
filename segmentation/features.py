"""Feature encoding and scaling, identical in the trainer and the consumer.

The encoded space is ``[scaled numeric features | one-hot categorical attributes]``. Each numeric
feature goes through three steps, all fitted by the trainer on its window and shipped in the
model bundle, so that the consumer applies them identically:

1. a signed ``log1p`` for heavy-tailed features (configured, or chosen because the window's
   skewness is high and the log reduces it); a negative value such as a refund keeps its sign;
2. clipping at the training window's quantiles widened by a margin: a value far outside
   anything seen in training (0.3% of rows at 1e9) cannot stretch the scaler or drag a centre;
3. centring and scaling (standard or robust).

One-hot columns hold 0 or ``categorical_weight``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy.stats import skew
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
    clip_low: list[float] | None = Field(
        None, description="per numeric feature, lower clip after the log (null: no clipping)"
    )
    clip_high: list[float] | None = Field(None, description="upper clip, as clip_low")
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
        scaled = self.encode_numeric(raw_numeric(events, self.numeric))
        onehot, unknown = one_hot(events, self.vocabulary, self.categorical_weight)
        return np.hstack([scaled, onehot]), unknown

    def encode_numeric(self, raw: np.ndarray) -> np.ndarray:
        """Raw numeric features (``numeric`` order) to scaled columns: log, clip, scale.

        >>> spec = FeatureSpec(numeric=["x"], log_features=["x"], clip_low=[0.0],
        ...                    clip_high=[2.0], center=[1.0], scale=[0.5])
        >>> spec.encode_numeric(np.array([[np.e - 1], [1e9], [-1e9]])).round(6).tolist()
        [[0.0], [2.0], [-2.0]]
        """
        transformed = log_transform(raw, self.log_mask())
        if self.clip_low is not None and self.clip_high is not None:
            transformed = np.clip(transformed, self.clip_low, self.clip_high)
        return scale(transformed, self.center, self.scale)

    def log_mask(self) -> np.ndarray:
        return np.array([name in self.log_features for name in self.numeric], dtype=bool)

    def to_raw_numeric(self, encoded: np.ndarray) -> np.ndarray:
        """Undo scaling (and the log) of the numeric columns: back to the events' units.

        >>> spec = FeatureSpec(numeric=["x"], log_features=["x"], center=[1.0], scale=[2.0])
        >>> spec.to_raw_numeric(spec.encode_numeric(np.array([[-50.0], [7.0]]))).round(6).tolist()
        [[-50.0], [7.0]]
        """
        numeric = encoded[:, : self.n_numeric] * np.asarray(self.scale) + np.asarray(self.center)
        mask = self.log_mask()
        numeric[:, mask] = np.sign(numeric[:, mask]) * np.expm1(np.abs(numeric[:, mask]))
        return numeric

    def reencode(self, encoded: np.ndarray, source: FeatureSpec) -> np.ndarray:
        """Express points encoded with ``source`` in this spec's space (numeric part rescaled,
        one-hot columns realigned by name; columns this spec does not know are dropped)."""
        numeric = source.to_raw_numeric(encoded)
        by_name = dict(zip(source.numeric, numeric.T, strict=True))
        scaled = self.encode_numeric(np.column_stack([by_name[n] for n in self.numeric]))
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
    """Signed ``log1p`` of the masked columns, ``sign(x) * log1p(|x|)``: identical to ``log1p``
    for non-negative values, and a refund of -50 stays as far below 0 as a purchase of 50 is
    above it (it is not folded onto 0).

    >>> log_transform(np.array([[np.e - 1, 5.0], [1 - np.e, 5.0]]), np.array([True, False])).round(6).tolist()
    [[1.0, 5.0], [-1.0, 5.0]]
    """
    if not mask.any():
        return raw
    out = raw.copy()
    out[:, mask] = np.sign(out[:, mask]) * np.log1p(np.abs(out[:, mask]))
    return out


def fit_clip(
    x: np.ndarray, quantile: float, margin: float
) -> tuple[list[float], list[float]] | None:
    """Per column, ``[q_lo - margin * r, q_hi + margin * r]`` where ``q_lo`` and ``q_hi`` are the
    ``quantile`` and ``1 - quantile`` quantiles and ``r = q_hi - q_lo``: every ordinary value,
    and a small but real segment beyond the quantiles, stays as it is; a value far outside the
    training range is pulled to the edge. ``quantile == 0`` turns clipping off (None).

    >>> x = np.concatenate([np.arange(1000.0), [1e9]])[:, None]
    >>> fit_clip(x, 0.01, 0.5)
    ([-480.0], [1480.0])
    >>> fit_clip(x, 0.0, 0.5) is None
    True
    """
    if quantile <= 0 or x.shape[0] == 0:
        return None
    lo, hi = np.quantile(x, [quantile, 1 - quantile], axis=0)
    width = hi - lo
    return (lo - margin * width).tolist(), (hi + margin * width).tolist()


# Half the range between the quantiles: winsorizing at the quantiles themselves cuts a lognormal
# tail enough to hide it (measured: 3 of 5 money features left unlogged in quality/datasets.py's
# outlier set); the encoding's wider SEG_CLIP_MARGIN lets 0.3% of absurd rows decide it.
SKEWNESS_CLIP_MARGIN = 0.5


def skewed_features(
    raw: np.ndarray, names: Sequence[str], threshold: float | None, quantile: float = 0.005,
    keep: Sequence[str] = (),
) -> list[str]:
    """Features whose window is heavy-tailed: skewness (measured clipped at the ``quantile`` and
    ``1 - quantile`` quantiles widened by ``SKEWNESS_CLIP_MARGIN``, so that a handful of absurd
    rows cannot decide it, while a heavy tail still counts) above ``threshold``, and lower in
    magnitude after the signed log. None turns the choice off.

    Features in ``keep`` (the ones the current model logs) stay logged while their skewness is
    above half the threshold: a choice that flipped on sampling noise would change the scaled
    space, and the segments' descriptions, from one retrain to the next.

    >>> rng = np.random.default_rng(0)
    >>> raw = np.column_stack([rng.lognormal(3, 1, 2000), rng.normal(50, 5, 2000),
    ...                        rng.lognormal(3, 0.45, 2000)])
    >>> skewed_features(raw, ["spend", "age", "visits"], 2.0)
    ['spend']
    >>> skewed_features(raw, ["spend", "age", "visits"], 2.0, keep=["visits"])
    ['spend', 'visits']
    """
    if threshold is None or raw.shape[0] < 3:
        return []
    bounds = fit_clip(raw, quantile, SKEWNESS_CLIP_MARGIN)
    clipped = np.clip(raw, *bounds) if bounds is not None else raw
    logged = log_transform(clipped, np.ones(raw.shape[1], dtype=bool))
    before = np.nan_to_num(skew(clipped, axis=0))
    after = np.nan_to_num(skew(logged, axis=0))
    return [n for n, b, a in zip(names, before, after, strict=True)
            if b > (threshold / 2 if n in keep else threshold) and abs(a) < abs(b)]


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
    log_skewness: float | None = None,
    clip: tuple[float, float] = (0.0, 0.0),
    keep_logged: Sequence[str] = (),
) -> FeatureSpec:
    """Fit the vocabulary and the numeric preprocessing on a training window."""
    numeric_spec = fit_numeric(
        raw_numeric(events, numeric), numeric, kind, log_features, log_skewness, clip, keep_logged
    )
    return numeric_spec.model_copy(update={
        "vocabulary": fit_vocabulary(events, categorical, vocabulary_min_count, vocabulary_max),
        "categorical_weight": categorical_weight,
    })


def fit_numeric(
    raw: np.ndarray,
    names: Sequence[str],
    kind: Literal["standard", "robust"] = "standard",
    log_features: Sequence[str] = (),
    log_skewness: float | None = None,
    clip: tuple[float, float] = (0.0, 0.0),
    keep_logged: Sequence[str] = (),
) -> FeatureSpec:
    """The numeric part of a spec fitted on a raw matrix: which features get the log (the
    configured ones plus the skewed ones; ``keep_logged``: those the current model logs), the
    clip bounds (``clip = (quantile, margin)``) and the scaler, in that order.

    >>> rng = np.random.default_rng(1)
    >>> raw = np.column_stack([rng.lognormal(3, 1, 1000), rng.normal(50, 5, 1000)])
    >>> raw[0] = [1e9, -1e9]
    >>> spec = fit_numeric(raw, ["spend", "age"], log_skewness=2.0, clip=(0.005, 2.0))
    >>> spec.log_features, bool(np.abs(spec.encode_numeric(raw)).max() < 20)
    (['spend'], True)
    """
    chosen = set(log_features) | set(skewed_features(raw, names, log_skewness, clip[0], keep_logged))
    logs = [n for n in names if n in chosen]
    transformed = log_transform(raw, np.array([n in chosen for n in names], dtype=bool))
    bounds = fit_clip(transformed, *clip)
    if bounds is not None:
        transformed = np.clip(transformed, *bounds)
    center, scale_ = fit_scaler(transformed, kind)
    return FeatureSpec(
        numeric=list(names), log_features=logs, scaler=kind, center=center, scale=scale_,
        clip_low=bounds[0] if bounds else None, clip_high=bounds[1] if bounds else None,
    )
