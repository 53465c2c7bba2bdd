"""The model bundle: everything the consumer needs to score, as validated JSON (never pickle).

A bundle read from Redis is untrusted input: ``ModelBundle.from_json`` validates the schema,
the shapes, that every number is finite and that ids are unique; ``check_compatible`` validates
it against the consumer's settings.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, model_validator

from segmentation.features import OTHER, FeatureSpec

# The bundle schema. A reader brings an older bundle up to it with ``migrate`` (one explicit step
# per version, ``MIGRATIONS``) before validating it, so no code path falls back on its own; a
# bundle of a newer schema is refused (upgrade the readers, the consumers, before the trainer).
# 2: every bundle records its fit parameters (``lineage.params``) and the accepted quality
#    baseline (``quality.gate``).
SCHEMA_VERSION = 2

# Bounds on what a bundle may hold. A bundle is untrusted input: whatever passes these scores
# every event to a finite distance, in bounded time and memory.
MAX_K = 256
MAX_COLUMNS = 2048
MAX_NAME_CHARS = 200
MAX_CENTROID_ABS = 1e6  # in scaled units (standard deviations)
MIN_SCALE, MAX_SCALE = 1e-12, 1e15
MAX_CENTER_ABS = 1e15
MAX_CATEGORICAL_WEIGHT = 1e3
SEGMENT_ID_LIMIT = 2**31  # segment ids are in [0, 2^31)


def is_segment_id(value: object) -> bool:
    """A segment id within a bundle's bounds (a bool is not an id).

    >>> is_segment_id(3), is_segment_id(True), is_segment_id(2**31), is_segment_id(-1)
    (True, False, False, False)
    """
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < SEGMENT_ID_LIMIT


def is_segment_name(value: object) -> bool:
    """A segment's business name within a bundle's bounds.

    >>> is_segment_name("loyal"), is_segment_name(""), is_segment_name("x" * 201)
    (True, False, False)
    """
    return isinstance(value, str) and 0 < len(value) <= MAX_NAME_CHARS


class BundleError(ValueError):
    """A bundle that must not be used, with the reason."""


class PartitionRange(BaseModel):
    partition: int
    start: int = Field(description="first offset read (inclusive)")
    end: int = Field(description="last offset read + 1 (exclusive)")


class Lineage(BaseModel):
    """Exactly what a version was trained on, to reproduce it."""

    topic: str
    partitions: list[PartitionRange] = Field(default_factory=list)
    window_start_ms: int = 0
    window_end_ms: int = 0
    rows_read: int = 0
    rows_invalid: int = 0
    rows_used: int = 0
    data_sha256: str = ""
    random_state: int = 0
    libraries: dict[str, str] = Field(default_factory=dict)
    params: dict[str, Any] = Field(
        default_factory=dict, description="fit settings (k, n_init, max_rows, scaler ...)"
    )


class LabelChange(BaseModel):
    segment_id: int
    previous_index: int | None = None
    index: int | None = None
    distance: float | None = None


SegmentStatus = Literal["kept", "drifted", "split", "merged", "born", "retired"]


class SegmentDiff(BaseModel):
    """What a retrain did to one segment (MONIC's transitions, found from the customers both
    models assign): ``kept`` and ``drifted`` continue a previous id (``drifted``: its centroid
    moved past the matching limit, its customers stayed); ``split``, ``merged`` and ``born``
    are new ids (``parents``: the previous ids they came from; none for a birth); ``retired`` is a
    previous id that no segment continues."""

    segment_id: int
    status: SegmentStatus
    parents: list[int] = Field(default_factory=list, max_length=MAX_K)
    index: int | None = None
    previous_index: int | None = None
    customers: int = Field(0, ge=0, description="window customers in this segment (new model; "
                           "the previous model's for a retired one)")
    moved: int = Field(0, ge=0, description="of them, customers whose segment id changes")

    def describe(self) -> str:
        """One line for people: ``trainer history``, the report.

        >>> SegmentDiff(segment_id=12, status="split", parents=[3], customers=410, moved=400).describe()
        '12 split from 3 (410 customers, 400 change id)'
        >>> SegmentDiff(segment_id=4, status="kept", parents=[4], customers=900, moved=12).describe()
        '4 kept (900 customers, 12 change id)'
        """
        origin = {"split": " from ", "merged": " from "}.get(self.status, "")
        parents = "+".join(map(str, self.parents)) if origin else ""
        return (f"{self.segment_id} {self.status}{origin}{parents} "
                f"({self.customers} customers, {self.moved} change id)")


class LabelMapping(BaseModel):
    """How this version's segments relate to the previous version's."""

    matched: list[LabelChange] = Field(default_factory=list)
    new: list[LabelChange] = Field(default_factory=list)
    retired: list[LabelChange] = Field(default_factory=list)
    restored: list[LabelChange] = Field(
        default_factory=list,
        description="set by `trainer rollback`: earlier ids this version brings back",
    )
    space: str = "new version's scaled space"
    threshold: float | None = None
    method: Literal["customers", "centroids", "none"] = Field(
        "centroids", description="customers: matched on who moved where (both models assign the "
        "window); centroids: on centroid distance (the previous model cannot score the window)")
    diff: list[SegmentDiff] = Field(default_factory=list, max_length=2 * MAX_K)
    moved_share: float | None = Field(
        None, ge=0, le=1, description="share of the window's customers whose segment id changes")
    structural_share: float | None = Field(
        None, ge=0, le=1, description="share of the window's customers in a retired segment or a "
        "new one (split, merged or born): what a structural change moves")

    @property
    def structural(self) -> list[SegmentDiff]:
        """The splits, merges, births and retirements of this retrain."""
        return [d for d in self.diff if d.status in ("split", "merged", "born", "retired")]


class Quality(BaseModel):
    silhouette: float
    davies_bouldin: float
    inertia: float
    shares: list[float]
    sizes: list[int]
    k_selection: str = "fixed"
    k_scores: list[dict[str, float]] = Field(default_factory=list)
    gate: dict[str, float | str | bool] = Field(default_factory=dict)
    feature_warnings: list[str] = Field(
        default_factory=list, max_length=MAX_COLUMNS,
        description="features the segmentation should not lean on: near-uniform ones, pairs that "
        "repeat each other")
    radius_p99: list[float] | None = Field(
        None, description="per segment index, the 99th percentile of its training rows' distance "
        "to its centroid (scaled units): an event beyond it is novel to the segment")
    radius_outlier: list[float] | None = Field(
        None, description="per segment index, the distance beyond which an event is an outlier "
        "(flagged, counted, never learned from)")


def _check_features(spec: FeatureSpec) -> None:
    """The feature spec of a bundle can be applied to any valid event without overflow."""
    n = len(spec.numeric)
    if len(spec.center) != n or len(spec.scale) != n:
        raise ValueError(f"scaler has wrong length for {n} numeric features")
    if len(set(spec.numeric)) != n or not set(spec.log_features) <= set(spec.numeric):
        raise ValueError("numeric features must be unique and include every log feature")
    if not set(spec.kinds) <= set(spec.numeric):
        raise ValueError("feature kinds must name numeric features")
    if len(spec.columns) > MAX_COLUMNS:
        raise ValueError(f"{len(spec.columns)} encoded columns; at most {MAX_COLUMNS}")
    if any(len(c) > 2 * MAX_NAME_CHARS + 1 for c in spec.columns):
        raise ValueError(f"feature and category names must have at most {MAX_NAME_CHARS} characters")
    if not all(math.isfinite(v) and abs(v) <= MAX_CENTER_ABS for v in spec.center):
        raise ValueError(f"scaler center must be finite and within +/-{MAX_CENTER_ABS:g}")
    if not all(math.isfinite(v) and MIN_SCALE <= v <= MAX_SCALE for v in spec.scale):
        raise ValueError(f"scaler scale must be within [{MIN_SCALE:g}, {MAX_SCALE:g}]")
    _check_clip(spec)
    if not (math.isfinite(spec.categorical_weight) and spec.categorical_weight <= MAX_CATEGORICAL_WEIGHT):
        raise ValueError(f"categorical_weight must be finite and at most {MAX_CATEGORICAL_WEIGHT:g}")
    for attribute, values in spec.vocabulary.items():
        if not values or values[-1] != OTHER or len(set(values)) != len(values):
            raise ValueError(f"vocabulary[{attribute}] must be unique values ending with {OTHER!r}")


def _check_clip(spec: FeatureSpec) -> None:
    """Clip bounds come in pairs, one per numeric feature, bounded (NaN fails the comparison) and
    ordered."""
    if spec.clip_low is None and spec.clip_high is None:
        return
    if spec.clip_low is None or spec.clip_high is None:
        raise ValueError("clip_low and clip_high must both be set or both be null")
    n = len(spec.numeric)
    if len(spec.clip_low) != n or len(spec.clip_high) != n:
        raise ValueError(f"clip bounds have wrong length for {n} numeric features")
    pairs = zip(spec.clip_low, spec.clip_high, strict=True)
    if not all(-MAX_CENTER_ABS <= lo <= hi <= MAX_CENTER_ABS for lo, hi in pairs):
        raise ValueError(f"clip bounds must be within +/-{MAX_CENTER_ABS:g} with clip_low <= clip_high")


# Fit parameters as the code that wrote schema-1 bundles used them when it did not record them:
# no clipping before ``clip_quantile``, every value seen once before the vocabulary cap.
V1_PARAM_DEFAULTS: dict[str, Any] = {"clip_quantile": 0.0, "vocabulary_max": 1000, "vocabulary_min_count": 1}
# The accepted quality baseline's entries in ``quality.gate`` (``segmentation.baseline``).
BASELINE_SILHOUETTE, BASELINE_DAVIES_BOULDIN, BASELINE_VERSION = (
    "baseline_silhouette", "baseline_davies_bouldin", "baseline_version")


def _object(value: Any) -> dict[str, Any] | None:
    """A copy of a JSON object (an absent one: empty); None for anything else, which a migration
    leaves as it is for validation to refuse (a bundle is untrusted input)."""
    if value is None:
        return {}
    return dict(value) if isinstance(value, dict) else None


def _v1_to_v2(raw: dict[str, Any]) -> dict[str, Any]:
    """Schema 1 -> 2. The parameters a schema-1 bundle did not record get what the code of the
    time used (``V1_PARAM_DEFAULTS``; the scaler, categorical weight and kinds are its feature
    spec's own). A bundle without a recorded baseline that was not forced was the accepted
    model: its own figures are the baseline. A forced one without it keeps none (only the
    versions before it can tell: ``trainer.pipeline.accepted_baseline`` looks)."""
    out = dict(raw)
    features, lineage, quality = (_object(out.get(name)) for name in ("features", "lineage", "quality"))
    params = _object(lineage.get("params")) if lineage is not None else None
    if lineage is not None and params is not None:  # a part of another shape is left to validation
        known: dict[str, Any] = {**V1_PARAM_DEFAULTS}
        if isinstance(out.get("centroids"), list):
            known["k"] = len(out["centroids"])
        if features is not None:
            kinds = features.get("kinds")
            known.update(scaler=features.get("scaler", "standard"),
                         categorical_weight=features.get("categorical_weight", 1.0),
                         feature_kinds=dict(kinds) if isinstance(kinds, dict) else {})
        lineage["params"] = {**known, **params}
        out["lineage"] = lineage
    gate = _object(quality.get("gate")) if quality is not None else None
    if quality is not None and gate is not None:
        if BASELINE_SILHOUETTE not in gate and not out.get("forced", False):
            gate.update({BASELINE_SILHOUETTE: quality.get("silhouette"),
                         BASELINE_DAVIES_BOULDIN: quality.get("davies_bouldin"),
                         BASELINE_VERSION: out.get("version")})
        quality["gate"] = gate
        out["quality"] = quality
    out["schema_version"] = 2
    return out


MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _v1_to_v2}


def migrate(raw: Any) -> Any:
    """``raw`` (a bundle's JSON object) brought up to ``SCHEMA_VERSION``; anything else as it
    is, for validation to refuse. One without ``schema_version`` is a bundle built by this code.

    >>> migrate({"schema_version": 1, "version": 3, "centroids": [[0.0]], "features": {},
    ...          "quality": {"silhouette": 0.5, "davies_bouldin": 0.7}})["quality"]["gate"]
    {'baseline_silhouette': 0.5, 'baseline_davies_bouldin': 0.7, 'baseline_version': 3}
    >>> migrate({"schema_version": 9})
    Traceback (most recent call last):
    ...
    ValueError: schema_version 9 is newer than this reader's 2: upgrade the consumers and tools first
    """
    if not isinstance(raw, dict):
        return raw
    version = raw.get("schema_version", SCHEMA_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"schema_version must be a positive integer, not {version!r}")
    if version > SCHEMA_VERSION:
        raise ValueError(f"schema_version {version} is newer than this reader's {SCHEMA_VERSION}: "
                         "upgrade the consumers and tools first")
    while version < SCHEMA_VERSION:
        raw = MIGRATIONS[version](raw)
        version += 1
    return raw


class ModelBundle(BaseModel):
    model_config = ConfigDict(frozen=True)

    schema_version: int = SCHEMA_VERSION
    version: int = Field(ge=1)
    created_at: AwareDatetime = Field(default_factory=lambda: datetime.now(UTC))
    features: FeatureSpec
    centroids: list[list[float]] = Field(description="in the encoded (scaled) space")
    segment_ids: list[int]
    segment_names: list[str]
    previous_version: int | None = None
    label_mapping: LabelMapping = Field(default_factory=LabelMapping)
    quality: Quality
    lineage: Lineage
    forced: bool = False
    rolled_back_from: int | None = Field(
        None, description="set by `trainer rollback`: the version whose model this republishes"
    )

    @model_validator(mode="before")
    @classmethod
    def _migrated(cls, data: Any) -> Any:
        return migrate(data)

    @model_validator(mode="after")
    def _consistent(self) -> ModelBundle:
        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(f"schema_version {self.schema_version} != {SCHEMA_VERSION}")
        k = len(self.centroids)
        if not 1 <= k <= MAX_K:
            raise ValueError(f"{k} centroids; 1..{MAX_K} allowed")
        _check_features(self.features)
        width = len(self.features.columns)
        if any(len(row) != width for row in self.centroids):
            raise ValueError(f"centroids must have {width} columns ({self.features.columns[:20]})")
        if len(self.segment_ids) != k or len(self.segment_names) != k:
            raise ValueError(f"{k} centroids need {k} segment ids and names")
        if len(set(self.segment_ids)) != k or any(not is_segment_id(i) for i in self.segment_ids):
            raise ValueError(f"segment ids must be unique and in [0, 2^31): {self.segment_ids}")
        if any(not is_segment_name(n) for n in self.segment_names):
            raise ValueError(f"segment names must have 1..{MAX_NAME_CHARS} characters")
        if not all(math.isfinite(v) and abs(v) <= MAX_CENTROID_ABS for row in self.centroids for v in row):
            raise ValueError(f"centroids must be finite and within +/-{MAX_CENTROID_ABS:g}")
        q = self.quality
        if len(q.shares) != k or len(q.sizes) != k:
            raise ValueError(f"quality.shares and quality.sizes need {k} entries")
        if not all(math.isfinite(v) and 0 <= v <= 1 for v in q.shares):
            raise ValueError("quality.shares must be in [0, 1]")
        for radii in (q.radius_p99, q.radius_outlier):
            if radii is not None and (len(radii) != k or not all(
                    math.isfinite(v) and 0 <= v <= MAX_CENTROID_ABS for v in radii)):
                raise ValueError(f"quality radii need {k} finite entries in [0, {MAX_CENTROID_ABS:g}]")
        return self

    @classmethod
    def from_json(cls, raw: str | bytes) -> ModelBundle:
        """Parse and validate, or raise ``BundleError`` saying why."""
        try:
            return cls.model_validate_json(raw)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            loc = ".".join(str(p) for p in first["loc"])
            raise BundleError(f"invalid bundle: {loc}: {first['msg']}") from None

    def to_json(self) -> str:
        return self.model_dump_json()

    @property
    def k(self) -> int:
        return len(self.centroids)

    def centroid_array(self) -> np.ndarray:
        return np.asarray(self.centroids, dtype=np.float64)

    def check_compatible(self, numeric: tuple[str, ...], categorical: tuple[str, ...]) -> None:
        """Raise ``BundleError`` unless every feature and attribute the bundle uses is configured
        (``numeric``: what the input contract requires of every event, so what a consumer can
        score with). A bundle that uses fewer is compatible: while a feature is added, consumers
        that require it already keep scoring with the model before it (docs/operations.md).

        >>> from segmentation.features import FeatureSpec
        >>> spec = FeatureSpec(numeric=["a", "b"], center=[0.0, 0.0], scale=[1.0, 1.0])
        >>> bundle = ModelBundle(version=3, features=spec, centroids=[[0.0, 0.0]], segment_ids=[0],
        ...     segment_names=["s"], quality=Quality(silhouette=0.3, davies_bouldin=1.0, inertia=1.0,
        ...     shares=[1.0], sizes=[1]), lineage=Lineage(topic="t"))
        >>> bundle.check_compatible(("a", "b", "c"), ())  # a feature added: still scorable
        >>> bundle.check_compatible(("a",), ())
        Traceback (most recent call last):
        ...
        segmentation.bundle.BundleError: bundle v3 uses features the input contract does not require: ['b']
        """
        missing = [f for f in self.features.numeric if f not in numeric]
        if missing:
            raise BundleError(
                f"bundle v{self.version} uses features the input contract does not require: {missing}")
        unknown = [a for a in self.features.vocabulary if a not in categorical]
        if unknown:
            raise BundleError(f"bundle v{self.version} uses attributes that are not configured: {unknown}")
