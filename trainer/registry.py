"""The stable segment registry: ids carried across versions, and business names for them."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from segmentation.bundle import LabelChange, LabelMapping, ModelBundle
from segmentation.features import FeatureSpec
from segmentation.matching import assign_segment_ids, median_pairwise_distance


def load_names(path: str | None) -> dict[int, str]:
    """``{"0": "Champions", ...}`` from a JSON file; a bad file is a clear error."""
    if not path:
        return {}
    try:
        raw = json.loads(Path(path).read_text())
        return {int(k): str(v) for k, v in raw.items()}
    except (OSError, ValueError, AttributeError) as exc:
        raise ValueError(f"names file {path}: expected a JSON object of id -> name ({exc})") from exc


def default_name(segment_id: int, centroid: np.ndarray, spec: FeatureSpec) -> str:
    """A readable default: the two numeric features furthest from the average, e.g.
    ``segment 3: high monetary_90d, low recency_days``.

    >>> spec = FeatureSpec(numeric=["spend", "recency"], center=[0.0, 0.0], scale=[1.0, 1.0])
    >>> default_name(3, np.array([2.0, -1.0]), spec)
    'segment 3: high spend, low recency'
    """
    numeric = centroid[: spec.n_numeric]
    top = np.argsort(-np.abs(numeric))[:2]
    parts = [f"{'high' if numeric[i] > 0 else 'low'} {spec.numeric[i]}" for i in top
             if abs(numeric[i]) >= 0.25]
    return f"segment {segment_id}: " + (", ".join(parts) if parts else "average")


def label_segments(
    previous: ModelBundle | None,
    spec: FeatureSpec,
    centroids: np.ndarray,
    threshold_fraction: float,
    fresh_ids: Callable[[int], list[int]],
    names: dict[int, str],
) -> tuple[list[int], list[str], LabelMapping]:
    """Segment ids and names for new centroids, and the mapping from the previous version.

    Matching happens in the *new* version's scaled space: the previous centroids are mapped
    back to raw units with the previous scaler and forward with the new one. The new scaler
    describes the data the new clusters were fitted on, so the threshold (a fraction of the
    median distance between new centroids) is in the same units as the clusters it judges.
    """
    threshold = threshold_fraction * median_pairwise_distance(centroids)
    if previous is None:
        prev_centroids = np.empty((0, centroids.shape[1]))
        prev_ids: list[int] = []
    else:
        prev_centroids = spec.reencode(previous.centroid_array(), previous.features)
        prev_ids = previous.segment_ids
    result = assign_segment_ids(prev_centroids, prev_ids, centroids, threshold, fresh_ids)
    segment_names = [
        names.get(sid) or default_name(sid, centroids[i], spec)
        for i, sid in enumerate(result.segment_ids)
    ]
    mapping = LabelMapping(
        matched=[LabelChange(segment_id=s, previous_index=p, index=i, distance=d)
                 for s, p, i, d in result.matched],
        new=[LabelChange(segment_id=s, index=i) for s, i in result.new],
        retired=[LabelChange(segment_id=s, previous_index=p) for s, p in result.retired],
        threshold=threshold,
    )
    return result.segment_ids, segment_names, mapping
