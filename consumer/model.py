"""The model in use, prepared for scoring: a validated bundle and the arrays the hot path needs.

Pure (no I/O): the watcher (``consumer.watcher``) loads and swaps it; the stages read it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from segmentation.bundle import ModelBundle, SegmentDiff

NEW_SEGMENT_STATUSES = ("split", "merged", "born")


@dataclass(frozen=True)
class ActiveModel:
    """A validated bundle with its arrays prepared for scoring: the centroids, and per segment
    index the training radii (None for a bundle that has none: no novelty or outlier signal)."""

    bundle: ModelBundle
    centroids: np.ndarray
    segment_ids: np.ndarray
    radius_p99: np.ndarray | None = None
    radius_outlier: np.ndarray | None = None
    lineage: Mapping[int, SegmentDiff] = field(default_factory=dict)  # new id -> its split/merge/birth

    @classmethod
    def of(cls, bundle: ModelBundle) -> ActiveModel:
        q = bundle.quality
        return cls(bundle, bundle.centroid_array(), np.asarray(bundle.segment_ids),
                   None if q.radius_p99 is None else np.asarray(q.radius_p99, dtype=np.float64),
                   None if q.radius_outlier is None else np.asarray(q.radius_outlier, dtype=np.float64),
                   born_segments(bundle))

    @property
    def version(self) -> int:
        return self.bundle.version

    @property
    def has_radii(self) -> bool:
        return self.radius_p99 is not None and self.radius_outlier is not None


def born_segments(bundle: ModelBundle) -> dict[int, SegmentDiff]:
    """The segments this version's retrain created from others or from nothing (split, merged,
    born), by segment id: a customer a new model moves into one has this lineage."""
    return {d.segment_id: d for d in bundle.label_mapping.diff if d.status in NEW_SEGMENT_STATUSES}
