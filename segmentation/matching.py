"""Stable segment ids: KMeans numbers clusters arbitrarily on every fit, so new centroids are
matched to the previous version's with the Hungarian algorithm under a distance threshold."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist


@dataclass(frozen=True)
class SegmentAssignment:
    """Segment id per new cluster index, and what happened to each id."""

    segment_ids: list[int]
    matched: list[tuple[int, int, int, float]] = field(default_factory=list)
    """(segment_id, previous index, new index, distance)"""
    new: list[tuple[int, int]] = field(default_factory=list)
    """(segment_id, new index)"""
    retired: list[tuple[int, int]] = field(default_factory=list)
    """(segment_id, previous index)"""


def match_centroids(
    previous: np.ndarray, current: np.ndarray, max_distance: float
) -> list[tuple[int, int, float]]:
    """Minimum-total-distance one-to-one pairs ``(previous_index, current_index, distance)``,
    keeping only pairs closer than ``max_distance``.

    >>> prev = np.array([[0.0, 0.0], [10.0, 0.0]])
    >>> curr = np.array([[10.5, 0.0], [0.2, 0.0], [50.0, 50.0]])
    >>> [(p, c, round(d, 2)) for p, c, d in match_centroids(prev, curr, 2.0)]
    [(0, 1, 0.2), (1, 0, 0.5)]
    """
    if previous.shape[0] == 0 or current.shape[0] == 0:
        return []
    cost = cdist(previous, current)
    # Pairs beyond the threshold cost more than any admissible set of pairs, so the assignment
    # maximises the number of admissible matches first and their closeness second.
    penalty = (cost.sum() + 1.0) * 2.0
    gated = np.where(cost <= max_distance, cost, penalty)
    rows, cols = linear_sum_assignment(gated)
    return [
        (int(r), int(c), float(cost[r, c]))
        for r, c in zip(rows, cols, strict=True)
        if cost[r, c] <= max_distance
    ]


def assign_segment_ids(
    previous: np.ndarray,
    previous_ids: Sequence[int],
    current: np.ndarray,
    max_distance: float,
    fresh_ids: Callable[[int], list[int]],
) -> SegmentAssignment:
    """Give each current cluster a stable id: matched clusters keep the previous id, the rest get
    fresh ids from ``fresh_ids(n)`` (never reused), unmatched previous ids are retired.

    >>> prev = np.array([[0.0], [10.0]])
    >>> a = assign_segment_ids(prev, [7, 8], np.array([[10.1], [30.0]]), 1.0, lambda n: [9])
    >>> a.segment_ids, a.new, a.retired
    ([8, 9], [(9, 1)], [(7, 0)])
    """
    pairs = match_centroids(previous, current, max_distance)
    ids: list[int | None] = [None] * current.shape[0]
    matched = []
    for p, c, d in pairs:
        ids[c] = int(previous_ids[p])
        matched.append((int(previous_ids[p]), p, c, d))
    unmatched = [i for i, v in enumerate(ids) if v is None]
    fresh = fresh_ids(len(unmatched)) if unmatched else []
    new = []
    for i, sid in zip(unmatched, fresh, strict=True):
        ids[i] = sid
        new.append((sid, i))
    kept = {p for p, _, _ in pairs}
    retired = [(int(previous_ids[p]), p) for p in range(previous.shape[0]) if p not in kept]
    return SegmentAssignment([int(v) for v in ids if v is not None], matched, new, retired)


def median_pairwise_distance(centroids: np.ndarray) -> float:
    """Median distance between distinct centroids (the scale of a threshold); 1.0 if k < 2.

    >>> median_pairwise_distance(np.array([[0.0], [1.0], [3.0]]))
    2.0
    """
    if centroids.shape[0] < 2:
        return 1.0
    d = cdist(centroids, centroids)
    return float(np.median(d[np.triu_indices_from(d, k=1)]))
