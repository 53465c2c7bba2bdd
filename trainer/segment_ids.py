"""The stable segment registry: ids carried across versions, and business names for them."""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from pathlib import Path

import numpy as np
from scipy.spatial.distance import cdist

from segmentation.bundle import LabelChange, LabelMapping, ModelBundle, SegmentDiff
from segmentation.cluster_metrics import nearest_two
from segmentation.features import FeatureSpec
from segmentation.matching import (
    ENVELOPE_SHARE,
    ENVELOPE_Z,
    SPLIT_SHARE,
    assign_segment_ids,
    median_pairwise_distance,
    novel_segments,
    segment_transitions,
    spread_distances,
    vetoed_by_geometry,
)


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


def previous_assignment(
    previous: ModelBundle, x_previous: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None]:
    """The previous model's segment index for each window row (``x_previous``: the rows encoded
    with the previous model's own spec, as the consumers score them), and which rows lie beyond
    the envelope of the segment it puts them in (None when the bundle records no envelope).

    Novelty leaves out how far the calendar moved each segment (``calendar_columns``: per
    segment, its customers' median offset in those columns is taken off, their spread stays): a
    lapsed customer a quarter older is further from every centre, not a new kind of customer, so
    ageing alone never makes a segment look born or vanished.

    >>> from segmentation.bundle import Lineage, Quality
    >>> b = ModelBundle(version=1, features=FeatureSpec(numeric=["x"], center=[0.0], scale=[1.0]),
    ...     centroids=[[0.0], [10.0]], segment_ids=[4, 5], segment_names=["a", "b"],
    ...     quality=Quality(silhouette=0.9, davies_bouldin=0.1, inertia=1.0, shares=[0.5, 0.5],
    ...                     sizes=[1, 1], radius_p99=[1.0, 1.0]), lineage=Lineage(topic="t"))
    >>> index, novel = previous_assignment(b, np.array([[0.5], [9.0], [4.0]]))
    >>> index.tolist(), novel.tolist()
    ([0, 1, 0], [False, False, True])
    """
    centroids = previous.centroid_array()
    index, _, _ = nearest_two(x_previous, centroids)
    radii = previous.quality.radius_p99
    if radii is None:
        return index, None
    residual = x_previous - centroids[index]
    calendar = np.flatnonzero(calendar_columns(previous.features))
    for i in np.unique(index):
        rows = np.flatnonzero(index == i)
        residual[np.ix_(rows, calendar)] -= np.median(residual[np.ix_(rows, calendar)], axis=0)
    return index, np.linalg.norm(residual, axis=1) > np.asarray(radii)[index]


def _diff_counts(
    previous_ids: np.ndarray, ids: np.ndarray, previous_labels: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per new index and per previous index: customers, and of them those whose id changes."""
    moved = previous_ids[previous_labels] != ids[labels]
    k, k_prev = ids.shape[0], previous_ids.shape[0]
    return (np.bincount(labels, minlength=k), np.bincount(labels[moved], minlength=k),
            np.bincount(previous_labels, minlength=k_prev),
            np.bincount(previous_labels[moved], minlength=k_prev))


def calendar_columns(spec: FeatureSpec) -> np.ndarray:
    """Per encoded column, whether it is a feature that grows with the calendar
    (``FeatureSpec.clock_features``): such a column moves centroids without moving customers.

    >>> calendar_columns(FeatureSpec(numeric=["x"], center=[0.0], scale=[1.0])).tolist()
    [False]
    """
    clock = set(spec.clock_features)
    return np.array([name in clock for name in spec.numeric] + [False] * (len(spec.columns) - spec.n_numeric),
                    dtype=bool)


def customer_mapping(
    previous: ModelBundle, centroids: np.ndarray, fresh_ids: Callable[[int], list[int]],
    previous_labels: np.ndarray, labels: np.ndarray, novel: np.ndarray | None,
    geometry: tuple[np.ndarray, np.ndarray, np.ndarray] | None, max_spread: float,
    retiring: Collection[int] = (),
) -> tuple[list[int], LabelMapping]:
    """Segment ids that follow the customers (``segmentation.matching.segment_transitions``): a
    new segment that continues a previous one keeps its id; a split, a merge or a birth gets a
    fresh id, and its parents are named. ``geometry``: the previous centroids in the new space,
    and each centroid's move in spread units over all columns and over those that do not age
    with the calendar; a continuation whose move over the latter exceeds ``max_spread`` is a
    replacement (``segmentation.matching.vetoed_by_geometry``); one whose move over all columns
    does is ``drifted`` (the calendar moved it, its customers stayed)."""
    k = centroids.shape[0]
    transitions = segment_transitions(previous_labels, labels, previous.k, k, novel, retiring)
    drift = None
    if geometry is not None:
        previous_centroids, drift, stable_moves = geometry
        moved_away = None if novel is None else novel_segments(labels, novel, k, ENVELOPE_SHARE, ENVELOPE_Z)
        transitions = vetoed_by_geometry(transitions, previous_centroids, centroids, stable_moves,
                                         max_spread, moved_away)
    previous_ids = np.asarray(previous.segment_ids)
    ids: list[int | None] = [None] * k
    for t in transitions:
        if t.status == "continued" and t.new is not None and t.previous is not None:
            ids[t.new] = int(previous_ids[t.previous])
    unmatched = [j for j in range(k) if ids[j] is None]
    for j, sid in zip(unmatched, fresh_ids(len(unmatched)) if unmatched else [], strict=True):
        ids[j] = sid
    final = np.asarray(ids, dtype=np.int64)
    customers, moved, previous_customers, previous_moved = _diff_counts(
        previous_ids, final, previous_labels, labels)
    matched, new, retired, diff = [], [], [], []
    for t in transitions:
        parents = [int(previous_ids[p]) for p in t.parents]
        if t.new is None:  # retired: a previous index, continued by no new segment
            p = t.previous or 0
            sid = int(previous_ids[p])
            retired.append(LabelChange(segment_id=sid, previous_index=p))
            diff.append(SegmentDiff(segment_id=sid, status="retired", previous_index=p,
                                    customers=int(previous_customers[p]), moved=int(previous_moved[p])))
            continue
        sid = int(final[t.new])
        counts = {"customers": int(customers[t.new]), "moved": int(moved[t.new])}
        if t.status == "continued" and t.previous is not None:
            distance = None if drift is None else float(drift[t.previous, t.new])
            matched.append(LabelChange(segment_id=sid, previous_index=t.previous, index=t.new,
                                       distance=distance))
            status = "drifted" if distance is not None and distance > max_spread else "kept"
            diff.append(SegmentDiff(segment_id=sid, status=status, parents=parents, index=t.new,
                                    previous_index=t.previous, **counts))
        else:
            new.append(LabelChange(segment_id=sid, index=t.new))
            diff.append(SegmentDiff(segment_id=sid, status=t.status,
                                    parents=parents, index=t.new, **counts))
    fresh = np.isin(final, [c.segment_id for c in new])
    gone = np.isin(previous_ids, [c.segment_id for c in retired])
    structural = fresh[labels] | gone[previous_labels]
    rows = max(labels.shape[0], 1)
    mapping = LabelMapping(
        matched=matched, new=new, retired=retired, diff=diff, method="customers",
        moved_share=float(moved.sum() / rows), structural_share=float(structural.sum() / rows),
        threshold=max_spread,
        space=("who moved where: the previous and the new model assign the same window; a flow "
               f"counts when it holds {SPLIT_SHARE:.0%} of both segments. Distances: the centroid's "
               f"move in standard deviations of the new segment (drifted beyond {max_spread:g})"),
    )
    return [int(v) for v in final], mapping


def centroid_diff(mapping: LabelMapping) -> list[SegmentDiff]:
    """The diff of a centroid matching: matched ids are kept, new ones born, the rest retired
    (no customer counts: the previous model could not score the window)."""
    return ([SegmentDiff(segment_id=c.segment_id, status="kept", parents=[c.segment_id],
                         index=c.index, previous_index=c.previous_index) for c in mapping.matched]
            + [SegmentDiff(segment_id=c.segment_id, status="born", index=c.index) for c in mapping.new]
            + [SegmentDiff(segment_id=c.segment_id, status="retired", previous_index=c.previous_index)
               for c in mapping.retired])


def centroids_in(spec: FeatureSpec, previous: ModelBundle | None) -> np.ndarray | None:
    """The previous model's centroids in ``spec``'s space; None without a previous model, or
    when it lacks some of ``spec``'s features (its centroids cannot be placed here)."""
    if previous is None or not set(spec.numeric) <= set(previous.features.numeric):
        return None
    return spec.reencode(previous.centroid_array(), previous.features)


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
    previous_labels: np.ndarray | None = None,
    novel: np.ndarray | None = None,
    retiring: Collection[int] = (),
) -> tuple[list[int], list[str], LabelMapping]:
    """Segment ids and names for new centroids, and the mapping (with the diff) from the
    previous version.

    **Ids follow the customers** when the previous model could score the window
    (``previous_labels``: its segment index for each row of ``x``; ``novel``: rows beyond its
    envelope; ``retiring``: previous segments the refit dropped, which parent nothing): see
    ``customer_mapping``. Features that move with the calendar move centroids,
    not customers, so they cannot renumber a customer base.

    **Centroid distance is the fallback**: matching happens in the *new* version's scaled
    space: the previous centroids are mapped back to raw units with the previous scaler and
    forward with the new one. A previous centroid keeps its id on a new one when it lies within
    ``max_spread`` standard deviations of the new segment's within-cluster covariance (``x``,
    ``labels``: the window the new centroids were fitted on), and within ``threshold_fraction``
    of the median distance between the new centroids (which only binds on segments that
    overlap much); two segments that merged lose theirs (``segmentation.matching.merged_pairs``).

    Names: the operator's (``names``, from ``SEG_NAMES_FILE``) first; a segment that keeps its id
    keeps its name (the label marketing acts on does not change with a refit's scaling); a new
    segment gets a description of its centroid.
    """
    cap = threshold_fraction * median_pairwise_distance(centroids)
    placed = centroids_in(spec, previous)
    comparable = placed is not None
    if previous is not None and placed is not None:
        prev_centroids, prev_ids = placed, previous.segment_ids
    else:
        # No previous version, or one without some of today's features: its centroids cannot
        # be placed in this space, so nothing matches on geometry.
        prev_centroids = np.empty((0, centroids.shape[1]))
        prev_ids = []
    cost = spread_distances(prev_centroids, centroids, x, labels)
    kept_names: dict[int, str] = {}
    if previous is not None:
        kept_names = dict(zip(previous.segment_ids, previous.segment_names, strict=True))
    if previous is not None and previous_labels is not None:
        stable = ~calendar_columns(spec)
        geometry = (prev_centroids, cost, spread_distances(
            prev_centroids[:, stable], centroids[:, stable], x[:, stable], labels)) if comparable else None
        segment_ids, mapping = customer_mapping(
            previous, centroids, fresh_ids, previous_labels, labels, novel, geometry, max_spread,
            retiring)
    else:
        cost[cdist(prev_centroids, centroids) > cap] = np.inf
        result = assign_segment_ids(prev_centroids, prev_ids, centroids, max_spread, fresh_ids, cost)
        retired = result.retired
        if previous is not None and not comparable:
            retired = [(sid, p) for p, sid in enumerate(previous.segment_ids)]
        segment_ids = result.segment_ids
        mapping = LabelMapping(
            matched=[LabelChange(segment_id=s, previous_index=p, index=i, distance=d)
                     for s, p, i, d in result.matched],
            new=[LabelChange(segment_id=s, index=i) for s, i in result.new],
            retired=[LabelChange(segment_id=s, previous_index=p) for s, p in retired],
            threshold=max_spread, method="centroids" if previous is not None else "none",
            space=(f"new version's scaled space; distances in standard deviations of the new "
                   f"segment's within-cluster covariance (kept below {max_spread:g}, and below "
                   f"{threshold_fraction:g} x the median centroid distance = {cap:.3g} scaled units)")
            if comparable or previous is None
            else "not comparable: the previous version lacks some of the features",
        )
        mapping = mapping.model_copy(update={"diff": centroid_diff(mapping)})
    segment_names = [
        names.get(sid) or kept_names.get(sid) or default_name(sid, centroids[i], spec)
        for i, sid in enumerate(segment_ids)
    ]
    return segment_ids, segment_names, mapping


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
