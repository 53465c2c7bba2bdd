"""The model bundle: everything the consumer needs to score, as validated JSON (never pickle).

A bundle read from Redis is untrusted input: ``ModelBundle.from_json`` validates the schema,
the shapes, that every number is finite and that ids are unique; ``check_compatible`` validates
it against the consumer's settings.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from segmentation.features import FeatureSpec

SCHEMA_VERSION = 1


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


class Quality(BaseModel):
    silhouette: float
    davies_bouldin: float
    inertia: float
    shares: list[float]
    sizes: list[int]
    k_selection: str = "fixed"
    k_scores: list[dict[str, float]] = Field(default_factory=list)
    gate: dict[str, float | str | bool] = Field(default_factory=dict)


class ModelBundle(BaseModel):
    model_config = ConfigDict(frozen=True)

    schema_version: int = SCHEMA_VERSION
    version: int = Field(ge=1)
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
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

    @model_validator(mode="after")
    def _consistent(self) -> ModelBundle:
        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(f"schema_version {self.schema_version} != {SCHEMA_VERSION}")
        k = len(self.centroids)
        if k < 1:
            raise ValueError("no centroids")
        width = len(self.features.columns)
        if any(len(row) != width for row in self.centroids):
            raise ValueError(f"centroids must have {width} columns ({self.features.columns})")
        n = len(self.features.numeric)
        if len(self.features.center) != n or len(self.features.scale) != n:
            raise ValueError(f"scaler has wrong length for {n} numeric features")
        if len(self.segment_ids) != k or len(self.segment_names) != k:
            raise ValueError(f"{k} centroids need {k} segment ids and names")
        if len(set(self.segment_ids)) != k:
            raise ValueError(f"duplicate segment ids {self.segment_ids}")
        numbers = [v for row in self.centroids for v in row]
        numbers += self.features.center + self.features.scale
        if not all(math.isfinite(v) for v in numbers):
            raise ValueError("non-finite number in centroids or scaler")
        if any(s <= 0 for s in self.features.scale):
            raise ValueError("scaler scale must be > 0")
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
        """Raise ``BundleError`` unless the bundle uses exactly the configured features."""
        if tuple(self.features.numeric) != numeric:
            raise BundleError(
                f"bundle v{self.version} features {self.features.numeric} != settings {list(numeric)}"
            )
        if tuple(self.features.vocabulary) != categorical:
            raise BundleError(
                f"bundle v{self.version} attributes {list(self.features.vocabulary)} "
                f"!= settings {list(categorical)}"
            )
