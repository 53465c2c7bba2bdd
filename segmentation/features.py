"""Feature encoding and scaling, identical in the trainer and the consumer.

The encoded space is ``[scaled numeric features | one-hot categorical attributes]``. Each numeric
feature has a declared kind (``FEATURE_KINDS``): ``count``, ``money``, ``duration``, ``ratio``,
``recency``, ``tenure`` or ``other``; ``recency`` and ``tenure`` are clock-driven (they grow with
the time since the last or first event, for every customer at once). Each numeric feature goes
through three steps, all fitted by the trainer on its window and shipped in the model bundle, so
that the consumer applies them identically:

1. a signed ``log1p`` for every feature of a ``LOGGED_KINDS`` kind, for the configured
   ``log_features``, and for a ``ratio`` or ``other`` feature whose window is heavy-tailed (its
   skewness is high and the log reduces it); a negative value such as a refund keeps its sign;
2. clipping at the training window's quantiles widened by a margin: a value far outside
   anything seen in training (0.3% of rows at 1e9) cannot stretch the scaler or drag a centre.
   The clip bounds are also the training envelope (``FeatureSpec.outside_envelope``): a row
   beyond them is left out of the K-Means fit, so absurd rows never form a segment;
3. centring and scaling (standard or robust). A ``count`` or ``money`` feature that is zero for
   a share ``z`` of the window is scaled down by ``zero_weight(z)``: after the log, its zeros are
   one point mass far from every purchase, and without the down-weighting "bought or not" is the
   split K-Means finds first, however the buyers differ (the weight is folded into ``scale``, so
   the bundle and the consumer need nothing more).

One-hot columns hold 0 or ``categorical_weight``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, get_args

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy.stats import skew
from sklearn.preprocessing import RobustScaler, StandardScaler

from segmentation.events import Event, raw_numeric

OTHER = "other"

FeatureKind = Literal["count", "money", "duration", "ratio", "recency", "tenure", "other"]
FEATURE_KINDS: tuple[str, ...] = get_args(FeatureKind)
# Kinds that always get the signed log: non-negative quantities with a long right tail (and money,
# whose refunds keep their sign). Measured on quality/realistic.py's tuning seeds, K-Means at the
# true K: ARI 0.66 logging counts, money, recency and ratios, 0.68 also logging tenure.
LOGGED_KINDS = frozenset({"count", "money", "duration", "recency", "tenure"})
# Kinds that grow with the calendar for every customer: matching must not read their drift as a
# change of segment.
CLOCK_KINDS = frozenset({"recency", "tenure"})
# Kinds whose zeros are a point mass (no purchase, no spend) that the scaling down-weights.
ZERO_INFLATED_KINDS = frozenset({"count", "money"})
# The most a mostly-zero feature is scaled down: a feature that is non-zero for a rare but real
# segment only keeps half its weight, never less.
MAX_ZERO_DOWNWEIGHT = 0.5


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
    kinds: dict[str, FeatureKind] = Field(
        default_factory=dict, description="numeric feature -> kind; a feature not listed is 'other'"
    )

    def kind_of(self, name: str) -> FeatureKind:
        """The declared kind of a numeric feature (``other`` when the bundle does not say).

        >>> FeatureSpec(numeric=["r", "x"], kinds={"r": "recency"}, center=[0, 0], scale=[1, 1]).kind_of("x")
        'other'
        """
        return self.kinds.get(name, "other")

    @property
    def clock_features(self) -> list[str]:
        """The numeric features that grow with the calendar (``recency`` and ``tenure`` kinds).

        >>> FeatureSpec(numeric=["r", "t", "x"], kinds={"r": "recency", "t": "tenure"},
        ...             center=[0, 0, 0], scale=[1, 1, 1]).clock_features
        ['r', 't']
        """
        return [n for n in self.numeric if self.kind_of(n) in CLOCK_KINDS]

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

    def encode(self, events: Sequence[Event], raw: np.ndarray | None = None) -> tuple[np.ndarray, int]:
        """Encode events; returns the matrix and how many category values were unknown
        (``raw``: their ``raw_numeric`` matrix when the caller has it)."""
        raw = raw_numeric(events, self.numeric) if raw is None else raw
        scaled = self.encode_numeric(raw)
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

    def outside_envelope(self, raw: np.ndarray) -> np.ndarray:
        """Per row, whether any numeric feature lies outside the training envelope (beyond the
        clip bounds, after the log): such a row is left out of the fit, and an event like it is
        an outlier.

        >>> spec = FeatureSpec(numeric=["x"], clip_low=[0.0], clip_high=[2.0], center=[1.0], scale=[1.0])
        >>> spec.outside_envelope(np.array([[1.0], [2.5], [-0.1]])).tolist()
        [False, True, True]
        """
        if self.clip_low is None or self.clip_high is None:
            return np.zeros(raw.shape[0], dtype=bool)
        transformed = log_transform(raw, self.log_mask())
        return np.asarray(((transformed < self.clip_low) | (transformed > self.clip_high)).any(axis=1))

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
    events: Iterable[Event], attributes: Sequence[str], min_count: int = 1,
    max_values: int | None = None,
) -> dict[str, list[str]]:
    """Per attribute, the ``max_values`` most frequent values seen at least ``min_count`` times
    (sorted), plus ``other`` for everything else: a high-cardinality attribute cannot widen
    the model without bound.

    >>> from segmentation.events import CustomerEvent
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
    events: Sequence[Event], vocabulary: dict[str, list[str]], weight: float = 1.0
) -> tuple[np.ndarray, int]:
    """One-hot columns for each attribute; unknown or absent values go to ``other``. A set
    column holds ``weight``: categories should shape segments, not split every segment.

    >>> from segmentation.events import CustomerEvent
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


def zero_weight(zero_share: float) -> float:
    """The weight of a ``count`` or ``money`` feature that is zero for ``zero_share`` of the
    window: ``1 - zero_share``, never below ``1 - MAX_ZERO_DOWNWEIGHT``. Continuous, so that a
    retrain on a similar window gets a similar space (a threshold would flip between retrains).

    Measured on quality/realistic.py's tuning seeds (K-Means at the true K, mean ARI): 0.68 without
    it, 0.72 to 0.73 with it; a "has any" indicator column next to the log of the non-zero values
    did worse (0.62), because the indicator is itself the two-point split it was meant to tame.

    >>> zero_weight(0.0), zero_weight(0.3), zero_weight(0.9)
    (1.0, 0.7, 0.5)
    """
    return 1.0 - min(max(zero_share, 0.0), MAX_ZERO_DOWNWEIGHT)


class FeatureSettings(Protocol):
    """What the preprocessing is configured by (``Settings`` provides it)."""

    @property
    def features(self) -> tuple[str, ...]: ...
    @property
    def categorical(self) -> tuple[str, ...]: ...
    @property
    def feature_kinds(self) -> dict[str, FeatureKind]: ...
    @property
    def scaler(self) -> Literal["standard", "robust"]: ...
    @property
    def log_features(self) -> tuple[str, ...]: ...
    @property
    def log_skewness(self) -> float | None: ...
    @property
    def clip_quantile(self) -> float: ...
    @property
    def clip_margin(self) -> float: ...
    @property
    def categorical_weight(self) -> float: ...
    @property
    def vocabulary_min_count(self) -> int: ...
    @property
    def vocabulary_max(self) -> int: ...


@dataclass(frozen=True)
class FeatureConfig:
    """What the preprocessing is fitted from: the features, their kinds and the fitting options
    (``FeatureConfig.of(settings)`` in the trainer; tests build one directly)."""

    numeric: tuple[str, ...]
    categorical: tuple[str, ...] = ()
    kinds: Mapping[str, FeatureKind] = field(default_factory=dict)
    scaler: Literal["standard", "robust"] = "standard"
    log_features: tuple[str, ...] = ()
    log_skewness: float | None = None
    clip_quantile: float = 0.0
    clip_margin: float = 0.0
    categorical_weight: float = 1.0
    vocabulary_min_count: int = 1
    vocabulary_max: int | None = None

    @classmethod
    def of(cls, settings: FeatureSettings) -> FeatureConfig:
        return cls(
            numeric=tuple(settings.features), categorical=tuple(settings.categorical),
            kinds={n: k for n, k in settings.feature_kinds.items() if n in settings.features},
            scaler=settings.scaler, log_features=tuple(settings.log_features),
            log_skewness=settings.log_skewness, clip_quantile=settings.clip_quantile,
            clip_margin=settings.clip_margin, categorical_weight=settings.categorical_weight,
            vocabulary_min_count=settings.vocabulary_min_count, vocabulary_max=settings.vocabulary_max,
        )

    def kind_of(self, name: str) -> FeatureKind:
        return self.kinds.get(name, "other")


def fit_spec(
    events: Sequence[Event], config: FeatureConfig, keep_logged: Sequence[str] = ()
) -> FeatureSpec:
    """Fit the vocabulary and the numeric preprocessing on a training window (``keep_logged``:
    the features the current model logs, see ``skewed_features``)."""
    numeric_spec = fit_numeric(raw_numeric(events, config.numeric), config, keep_logged)
    return numeric_spec.model_copy(update={
        "vocabulary": fit_vocabulary(events, config.categorical, config.vocabulary_min_count,
                                     config.vocabulary_max),
        "categorical_weight": config.categorical_weight,
    })


def logged_features(raw: np.ndarray, config: FeatureConfig, keep_logged: Sequence[str] = ()) -> list[str]:
    """The features that get the signed log: those of a ``LOGGED_KINDS`` kind, the configured
    ``log_features``, and the ``ratio`` and ``other`` ones the skewness rule picks.

    >>> rng = np.random.default_rng(0)
    >>> raw = np.column_stack([rng.poisson(3, 500), rng.normal(50, 5, 500), rng.lognormal(3, 1, 500)])
    >>> logged_features(raw, FeatureConfig(("visits", "age", "spend"), kinds={"visits": "count"},
    ...                                    log_skewness=2.0))
    ['visits', 'spend']
    """
    by_rule = [i for i, n in enumerate(config.numeric) if config.kind_of(n) not in LOGGED_KINDS]
    skewed = skewed_features(raw[:, by_rule], [config.numeric[i] for i in by_rule],
                             config.log_skewness, config.clip_quantile, keep_logged)
    chosen = set(config.log_features) | set(skewed)
    return [n for n in config.numeric if n in chosen or config.kind_of(n) in LOGGED_KINDS]


def zero_weights(raw: np.ndarray, config: FeatureConfig) -> np.ndarray:
    """Per numeric feature, ``zero_weight`` of its share of zeros for a ``count`` or ``money``
    feature, 1 otherwise.

    >>> zero_weights(np.array([[0.0, 0.0], [0.0, 1.0], [2.0, 1.0], [0.0, 5.0]]),
    ...              FeatureConfig(("orders", "x"), kinds={"orders": "count"})).tolist()
    [0.5, 1.0]
    """
    shares = (raw == 0).mean(axis=0) if raw.shape[0] else np.zeros(raw.shape[1])
    return np.array([zero_weight(float(z)) if config.kind_of(n) in ZERO_INFLATED_KINDS else 1.0
                     for n, z in zip(config.numeric, shares, strict=True)])


def fit_numeric(raw: np.ndarray, config: FeatureConfig, keep_logged: Sequence[str] = ()) -> FeatureSpec:
    """The numeric part of a spec fitted on a raw matrix (columns in ``config.numeric`` order):
    which features get the log (``logged_features``), the clip bounds (``clip_quantile``,
    ``clip_margin``), the scaler, and the zero down-weighting, in that order.

    >>> rng = np.random.default_rng(1)
    >>> raw = np.column_stack([rng.lognormal(3, 1, 1000), rng.normal(50, 5, 1000)])
    >>> raw[0] = [1e9, -1e9]
    >>> config = FeatureConfig(("spend", "age"), log_skewness=2.0, clip_quantile=0.005, clip_margin=2.0)
    >>> spec = fit_numeric(raw, config)
    >>> spec.log_features, bool(np.abs(spec.encode_numeric(raw)).max() < 20)
    (['spend'], True)
    >>> spec.outside_envelope(raw)[:3].tolist()
    [True, False, False]
    """
    names = list(config.numeric)
    logs = logged_features(raw, config, keep_logged)
    transformed = log_transform(raw, np.array([n in logs for n in names], dtype=bool))
    bounds = fit_clip(transformed, config.clip_quantile, config.clip_margin)
    if bounds is not None:
        inside = ~((transformed < bounds[0]) | (transformed > bounds[1])).any(axis=1)
        # the scaler and the zero shares come from the rows inside the envelope, the ones the
        # K-Means fit sees; clipped absurd rows would still stretch a standard deviation
        transformed = np.clip(transformed, *bounds)[inside] if inside.any() else np.clip(transformed, *bounds)
        raw = raw[inside] if inside.any() else raw
    center, scale_ = fit_scaler(transformed, config.scaler)
    scale_ = (np.asarray(scale_) / zero_weights(raw, config)).tolist()
    return FeatureSpec(
        numeric=names, log_features=logs, scaler=config.scaler, center=center, scale=scale_,
        clip_low=bounds[0] if bounds else None, clip_high=bounds[1] if bounds else None,
        kinds={n: config.kind_of(n) for n in names if config.kind_of(n) != "other"},
    )
