"""The stable segment registry: ids carried across versions, and business names for them."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy.spatial.distance import cdist

from segmentation.bundle import LabelChange, LabelMapping, ModelBundle
from segmentation.features import FeatureSpec
from segmentation.matching import assign_segment_ids, median_pairwise_distance, spread_distances


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
    *,
    x: np.ndarray,
    labels: np.ndarray,
    max_spread: float,
) -> tuple[list[int], list[str], LabelMapping]:
    """Segment ids and names for new centroids, and the mapping from the previous version.

    Matching happens in the *new* version's scaled space: the previous centroids are mapped
    back to raw units with the previous scaler and forward with the new one. A previous centroid
    keeps its id on a new one when it lies within ``max_spread`` standard deviations of the new
    segment's within-cluster covariance (``x``, ``labels``: the window the new centroids were
    fitted on), and within ``threshold_fraction`` of the median distance between the new
    centroids (which only binds on segments that overlap much); two segments that merged lose
    theirs (``segmentation.matching.merged_pairs``). Distances in the mapping are in those
    standard deviations.

    Names: the operator's (``names``, from ``SEG_NAMES_FILE``) first; a segment that keeps its id
    keeps its name (the label marketing acts on does not change with a refit's scaling); a new
    segment gets a description of its centroid.
    """
    cap = threshold_fraction * median_pairwise_distance(centroids)
    comparable = previous is not None and set(spec.numeric) <= set(previous.features.numeric)
    if previous is not None and comparable:
        prev_centroids = spec.reencode(previous.centroid_array(), previous.features)
        prev_ids = previous.segment_ids
    else:
        # No previous version, or one without some of today's features: its centroids cannot
        # be placed in this space, so nothing matches and all of its ids retire.
        prev_centroids = np.empty((0, centroids.shape[1]))
        prev_ids = []
    cost = spread_distances(prev_centroids, centroids, x, labels)
    cost[cdist(prev_centroids, centroids) > cap] = np.inf
    result = assign_segment_ids(prev_centroids, prev_ids, centroids, max_spread, fresh_ids, cost)
    retired = result.retired
    if previous is not None and not comparable:
        retired = [(sid, p) for p, sid in enumerate(previous.segment_ids)]
    kept_names: dict[int, str] = {}
    if previous is not None and comparable:
        kept_names = dict(zip(prev_ids, previous.segment_names, strict=True))
    segment_names = [
        names.get(sid) or kept_names.get(sid) or default_name(sid, centroids[i], spec)
        for i, sid in enumerate(result.segment_ids)
    ]
    mapping = LabelMapping(
        matched=[LabelChange(segment_id=s, previous_index=p, index=i, distance=d)
                 for s, p, i, d in result.matched],
        new=[LabelChange(segment_id=s, index=i) for s, i in result.new],
        retired=[LabelChange(segment_id=s, previous_index=p) for s, p in retired],
        threshold=max_spread,
        space=(f"new version's scaled space; distances in standard deviations of the new segment's "
               f"within-cluster covariance (kept below {max_spread:g}, and below "
               f"{threshold_fraction:g} x the median centroid distance = {cap:.3g} scaled units)")
        if comparable or previous is None
        else "not comparable: the previous version lacks some of the features",
    )
    return result.segment_ids, segment_names, mapping


def rollback_mapping(base: ModelBundle | None, target: ModelBundle) -> LabelMapping:
    """The label changes of republishing ``target`` on top of ``base`` (a rollback): ids are
    compared by identity, since the target's ids are the ones it was published with. Ids only
    the target has come back (``restored``); ids only the base has are retired. Distances of the
    ids both have are measured in the target's scaled space.

    >>> from segmentation.bundle import Lineage, Quality
    >>> spec = FeatureSpec(numeric=["x"], center=[0.0], scale=[1.0])
    >>> def bundle(version, ids, xs):
    ...     return ModelBundle(version=version, features=spec, centroids=[[x] for x in xs],
    ...         segment_ids=ids, segment_names=[str(i) for i in ids],
    ...         quality=Quality(silhouette=0.5, davies_bouldin=0.5, inertia=1.0,
    ...                         shares=[1 / len(ids)] * len(ids), sizes=[1] * len(ids)),
    ...         lineage=Lineage(topic="t"))
    >>> m = rollback_mapping(bundle(2, [0, 2], [0.5, 9.0]), bundle(1, [0, 1], [0.0, 5.0]))
    >>> [(c.segment_id, c.distance) for c in m.matched]
    [(0, 0.5)]
    >>> [c.segment_id for c in m.restored], [c.segment_id for c in m.retired]
    ([1], [2])
    """
    base_index = {} if base is None else {sid: i for i, sid in enumerate(base.segment_ids)}
    in_target_space = None
    if base is not None and set(target.features.numeric) <= set(base.features.numeric):
        in_target_space = target.features.reencode(base.centroid_array(), base.features)
    target_centroids = target.centroid_array()
    matched, restored = [], []
    for i, sid in enumerate(target.segment_ids):
        p = base_index.get(sid)
        if p is None:
            restored.append(LabelChange(segment_id=sid, index=i))
            continue
        distance = None
        if in_target_space is not None:
            distance = float(np.linalg.norm(in_target_space[p] - target_centroids[i]))
        matched.append(LabelChange(segment_id=sid, previous_index=p, index=i, distance=distance))
    kept = set(target.segment_ids)
    retired = [LabelChange(segment_id=sid, previous_index=p) for sid, p in base_index.items()
               if sid not in kept]
    return LabelMapping(
        matched=matched, retired=retired, restored=restored,
        space=f"rollback to v{target.version}: ids compared by identity, distances in its space",
    )
