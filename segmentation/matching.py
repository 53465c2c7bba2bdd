"""Stable segment ids: KMeans numbers clusters arbitrarily on every fit, so new centroids are
matched to the previous version's with the Hungarian algorithm under a distance threshold.

The threshold is in **spread units**: how many within-cluster standard deviations of the new
segment its centroid lies from the old one (the Mahalanobis distance under the new segment's
covariance). A population that drifted a little keeps its id; a merged segment (its centroid
halfway between two old ones) and a new population far from any old centroid get fresh ids, and
so do the two halves K-Means cuts a merged population into (``merged_pairs``). A fraction of
the distances between the centroids (the old rule: about 6 standard deviations on the demo data)
let a different population inherit a vanished segment's id and kept both old ids on the two
halves of a merge.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

# Added to the diagonal of every within-cluster covariance, as a fraction of the cluster's mean
# variance per column: along a column a cluster does not vary in (a one-hot column of a
# single-channel segment), a tiny move would otherwise count as infinitely many deviations.
SPREAD_RIDGE = 0.01

# Two matched segments now closer than this fraction of their previous distance have merged.
MERGE_RATIO = 0.5


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


def cluster_residuals(x: np.ndarray, labels: np.ndarray, centroids: np.ndarray) -> list[np.ndarray]:
    """Per cluster index, its rows minus its centroid.

    >>> [r.tolist() for r in cluster_residuals(np.array([[0.0], [2.0], [5.0]]), np.array([0, 0, 1]),
    ...                                        np.array([[1.0], [5.0]]))]
    [[[-1.0], [1.0]], [[0.0]]]
    """
    return [x[labels == j] - centroids[j] for j in range(centroids.shape[0])]


def within_covariance(residuals: np.ndarray) -> np.ndarray:
    """A cluster's covariance about its centroid (from its residuals, or the residuals of
    several clusters for their pooled covariance), with ``SPREAD_RIDGE`` of its mean variance
    added to the diagonal.

    >>> within_covariance(np.array([[-1.0, 0.0], [1.0, 0.0]])).tolist()
    [[1.005, 0.0], [0.0, 0.005]]
    """
    d = residuals.shape[1]
    if residuals.shape[0] == 0:
        return np.zeros((d, d))
    covariance = residuals.T @ residuals / residuals.shape[0]
    covariance[np.diag_indices(d)] += SPREAD_RIDGE * float(np.trace(covariance)) / d
    return covariance


def spread_units(moves: np.ndarray, covariance: np.ndarray) -> np.ndarray:
    """The length of each move (rows) in standard deviations of a cluster with ``covariance``
    (the Mahalanobis length): how many of its own deviations a centroid moved, whichever way.
    ``inf`` for a move where the cluster has no spread at all.

    >>> cov = np.array([[4.0, 0.0], [0.0, 0.01]])  # long along x, narrow along y
    >>> spread_units(np.array([[6.0, 0.0], [0.0, 0.3], [0.0, 0.0]]), cov).tolist()
    [3.0, 3.0, 0.0]
    """
    lengths = np.linalg.norm(moves, axis=1)
    if not np.any(covariance):
        return np.where(lengths > 0, np.inf, 0.0)
    solved = np.linalg.solve(covariance, moves.T)
    return np.sqrt(np.maximum(np.einsum("ij,ji->i", moves, solved), 0.0))


def pair_separation(residuals: Sequence[np.ndarray], centroids: np.ndarray, i: int, j: int) -> float:
    """How far apart segments i and j are in standard deviations of their pooled within-cluster
    covariance (Fisher's separation): K-Means cutting one normal population in two leaves
    halves about 2.65 apart; two populations that are really distinct are further.
    ``residuals``: per segment, its rows minus its centroid (``cluster_residuals``).

    >>> rng = np.random.default_rng(0)
    >>> x = np.vstack([rng.normal(0, 1, (500, 2)), rng.normal([6, 0], 1, (500, 2))])
    >>> labels = np.repeat([0, 1], 500); c = np.array([x[:500].mean(0), x[500:].mean(0)])
    >>> round(pair_separation(cluster_residuals(x, labels, c), c, 0, 1))
    6
    """
    pooled = within_covariance(np.vstack([residuals[i], residuals[j]]))
    return float(spread_units((centroids[j] - centroids[i])[None, :], pooled)[0])


def spread_distances(
    previous: np.ndarray, current: np.ndarray, x: np.ndarray, labels: np.ndarray
) -> np.ndarray:
    """``[i, j]``: distance from previous centroid i to current centroid j in within-cluster
    standard deviations of cluster j (``x``, ``labels``: the rows the current centroids were
    fitted on).

    >>> rng = np.random.default_rng(0)
    >>> x = np.vstack([rng.normal(0, 1, (500, 2)), rng.normal(20, 2, (500, 2))])
    >>> labels = np.repeat([0, 1], 500)
    >>> current = np.array([x[:500].mean(0), x[500:].mean(0)])
    >>> spread_distances(np.array([[3.0, 0.0], [20.0, 26.0]]), current, x, labels).round(0).tolist()
    [[3.0, 13.0], [33.0, 3.0]]
    """
    residuals = cluster_residuals(x, labels, current)
    out = np.empty((previous.shape[0], current.shape[0]))
    for j in range(current.shape[0]):
        out[:, j] = spread_units(current[j] - previous, within_covariance(residuals[j]))
    return out


def match_centroids(
    previous: np.ndarray, current: np.ndarray, max_distance: float, cost: np.ndarray | None = None
) -> list[tuple[int, int, float]]:
    """Minimum-total-distance one-to-one pairs ``(previous_index, current_index, distance)``,
    keeping only pairs closer than ``max_distance``. ``cost``: the distances to match on
    (``[previous, current]``, ``inf`` for a pair that may never match); Euclidean by default.

    >>> prev = np.array([[0.0, 0.0], [10.0, 0.0]])
    >>> curr = np.array([[10.5, 0.0], [0.2, 0.0], [50.0, 50.0]])
    >>> [(p, c, round(d, 2)) for p, c, d in match_centroids(prev, curr, 2.0)]
    [(0, 1, 0.2), (1, 0, 0.5)]
    """
    if previous.shape[0] == 0 or current.shape[0] == 0:
        return []
    if cost is None:
        cost = cdist(previous, current)
    admissible = cost <= max_distance
    # Pairs beyond the threshold cost more than any admissible set of pairs, so the assignment
    # maximises the number of admissible matches first and their closeness second.
    penalty = (float(cost[admissible].sum()) + 1.0) * 2.0
    gated = np.where(admissible, cost, penalty)
    rows, cols = linear_sum_assignment(gated)
    return [
        (int(r), int(c), float(cost[r, c]))
        for r, c in zip(rows, cols, strict=True)
        if admissible[r, c]
    ]


def merged_pairs(
    previous: np.ndarray, current: np.ndarray, pairs: list[tuple[int, int, float]],
    max_ratio: float = MERGE_RATIO,
) -> set[int]:
    """Current indexes of matched pairs whose two segments converged: now closer than
    ``max_ratio`` x the distance between the previous centroids they continue. Two segments that
    closed more than half their gap in one retrain have merged (K-Means then cuts the merged
    population in two, a half near each old centroid); neither half continues either segment.

    >>> prev = np.array([[0.0], [5.0], [20.0]])
    >>> pairs = [(0, 0, 0.1), (1, 1, 0.1), (2, 2, 0.1)]
    >>> sorted(merged_pairs(prev, np.array([[2.0], [3.0], [20.0]]), pairs))
    [0, 1]
    >>> merged_pairs(prev, np.array([[0.1], [4.0], [20.0]]), pairs)
    set()
    """
    merged: set[int] = set()
    for (p1, c1, _), (p2, c2, _) in itertools.combinations(pairs, 2):
        before = float(np.linalg.norm(previous[p1] - previous[p2]))
        if float(np.linalg.norm(current[c1] - current[c2])) < max_ratio * before:
            merged |= {c1, c2}
    return merged


def assign_segment_ids(
    previous: np.ndarray,
    previous_ids: Sequence[int],
    current: np.ndarray,
    max_distance: float,
    fresh_ids: Callable[[int], list[int]],
    cost: np.ndarray | None = None,
) -> SegmentAssignment:
    """Give each current cluster a stable id: matched clusters keep the previous id, the rest get
    fresh ids from ``fresh_ids(n)`` (never reused), unmatched previous ids are retired.
    ``cost`` as for ``match_centroids``; pairs of segments that merged (``merged_pairs``) do not
    keep their ids.

    >>> prev = np.array([[0.0], [10.0]])
    >>> a = assign_segment_ids(prev, [7, 8], np.array([[10.1], [30.0]]), 1.0, lambda n: [9])
    >>> a.segment_ids, a.new, a.retired
    ([8, 9], [(9, 1)], [(7, 0)])
    """
    pairs = match_centroids(previous, current, max_distance, cost)
    merged = merged_pairs(previous, current, pairs)
    pairs = [(p, c, d) for p, c, d in pairs if c not in merged]
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


# MONIC's thresholds (Spiliopoulou et al., KDD 2006, as R's clusTransition uses them): a flow
# of customers between an old and a new segment counts when it holds at least SPLIT_SHARE of
# the old segment and of the new one; a new segment whose customers are mostly beyond the old
# model's envelope (novel to the segment that held them) is a birth, not a piece of that segment.
SPLIT_SHARE = 0.3
BORN_NOVEL_SHARE = 0.5
# The share of a segment's own customers its envelope (the 99th percentile distance) leaves
# out: a segment with no more novel customers than this, give or take ENVELOPE_Z binomial
# standard deviations of sampling noise, holds the previous segment's customers.
ENVELOPE_SHARE = 0.01
ENVELOPE_Z = 3.0
VANISHED_NOVEL_SHARE = 0.9


@dataclass(frozen=True)
class Transition:
    """What a retrain did to one segment, found from the customers both models assign.

    ``new``/``previous``: the segment's index in the new / previous model (None for a
    retired / born one); ``parents``: previous indexes it came from."""

    status: Literal["continued", "split", "merged", "born", "retired"]
    new: int | None
    previous: int | None
    parents: tuple[int, ...] = ()


def customer_flows(previous: np.ndarray, current: np.ndarray, k_previous: int, k_current: int) -> np.ndarray:
    """``[i, j]``: how many customers the previous model puts in segment i and the new one in j.

    >>> customer_flows(np.array([0, 0, 1, 1]), np.array([1, 1, 1, 0]), 2, 2).tolist()
    [[0, 2], [1, 1]]
    """
    flows = np.zeros((k_previous, k_current), dtype=np.int64)
    np.add.at(flows, (previous, current), 1)
    return flows


def novel_segments(current: np.ndarray, novel: np.ndarray | None, k_current: int,
                   share: float = BORN_NOVEL_SHARE, z: float = 0.0) -> set[int]:
    """New segments more of whose customers were novel to the previous model (beyond the
    envelope of the segment it put them in) than ``share`` of them (most of them by default),
    plus ``z`` binomial standard deviations: a share the envelope leaves out by construction
    (``ENVELOPE_SHARE``) is only exceeded when more customers are beyond it than chance puts
    there.

    >>> sorted(novel_segments(np.array([0, 0, 1, 1, 1]), np.array([0, 0, 1, 1, 0], bool), 2))
    [1]
    >>> labels, novel = np.zeros(1500, int), np.arange(1500) < 24  # 1.6% novel: 15 expected, sd 3.9
    >>> novel_segments(labels, novel, 1, ENVELOPE_SHARE)
    {0}
    >>> novel_segments(labels, novel, 1, ENVELOPE_SHARE, ENVELOPE_Z)
    set()
    """
    if novel is None:
        return set()
    sizes = np.bincount(current, minlength=k_current)
    novel_counts = np.bincount(current[novel], minlength=k_current)
    allowed = share * sizes + z * np.sqrt(sizes * share * (1 - share))
    return {j for j in range(k_current) if sizes[j] > 0 and novel_counts[j] >= allowed[j]}


def significant_flows(flows: np.ndarray, excluded: set[int]) -> np.ndarray:
    """``[i, j]``: the flow holds at least ``SPLIT_SHARE`` of old i's customers (not counting
    those who went to the ``excluded`` new segments) and of new j's, or old i was absorbed by
    new j (``absorbed``).

    >>> significant_flows(np.array([[500, 0], [90, 10], [0, 400]]), set()).tolist()
    [[True, False], [True, False], [False, True]]
    """
    kept_columns = [j for j in range(flows.shape[1]) if j not in excluded]
    old_sizes = flows[:, kept_columns].sum(axis=1, keepdims=True)
    new_sizes = flows.sum(axis=0, keepdims=True)
    significant = (flows >= SPLIT_SHARE * old_sizes) & (flows >= SPLIT_SHARE * new_sizes) & (flows > 0)
    significant |= absorbed(flows, old_sizes)
    significant[:, sorted(excluded)] = False
    return np.asarray(significant)


def absorbed(flows: np.ndarray, old_sizes: np.ndarray | None = None) -> np.ndarray:
    """``[i, j]``: at least ``1 - SPLIT_SHARE`` of old i's customers went to new j, however
    small a part of j they are (MONIC's absorption): a segment the previous model now fills
    with few customers, all of them in one new segment, went there. When two populations meet,
    the previous model puts most of the merged customers in one of its two segments (the
    boundary between them is no longer where the customers are); the other keeps a few, and
    they all go to the merged segment, which is its child too.

    >>> absorbed(np.array([[500, 0], [90, 10], [0, 400]])).tolist()
    [[True, False], [True, False], [False, True]]
    """
    sizes = flows.sum(axis=1, keepdims=True) if old_sizes is None else old_sizes
    return np.asarray((flows >= (1 - SPLIT_SHARE) * sizes) & (flows > 0))


def vanished_segments(previous: np.ndarray, novel: np.ndarray | None, k_previous: int) -> set[int]:
    """Previous segments whose population is gone: at least ``VANISHED_NOVEL_SHARE`` of the
    customers the previous model still puts in them are beyond their envelope (what they hold
    now is somebody else, the nearest segment to a new population). They parent nothing.

    >>> sorted(vanished_segments(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1], bool), 2))
    [1]
    """
    if novel is None:
        return set()
    sizes = np.bincount(previous, minlength=k_previous)
    novel_counts = np.bincount(previous[novel], minlength=k_previous)
    return {i for i in range(k_previous)
            if sizes[i] > 0 and novel_counts[i] >= VANISHED_NOVEL_SHARE * sizes[i]}


def born_segments(flows: np.ndarray, novel: set[int], vanished: Collection[int] = ()) -> set[int]:
    """The novel new segments that are births: every previous segment they draw customers from
    (``vanished`` ones aside) is still continued by another new segment. A novel segment that
    took all of its parents' customers is where they went (a merge at their midpoint, a
    population that moved), not a new population.

    >>> flows = np.array([[100, 40, 0], [0, 0, 80]])  # old 0 -> new 0 and novel new 1; old 1 -> new 2
    >>> born_segments(flows, {1}), born_segments(flows, {1, 2}), born_segments(flows, {1, 2}, {1})
    ({1}, {1}, {1, 2})
    >>> born_segments(np.array([[50], [50]]), {0}, {0, 1})  # both gone to one place: a merge
    set()
    """
    significant = significant_flows(flows, novel)
    swallowed = absorbed(flows)
    born = set()
    for j in novel:
        size = max(int(flows[:, j].sum()), 1)
        parents = [int(i) for i in np.flatnonzero((flows[:, j] >= SPLIT_SHARE * size) | swallowed[:, j])]
        present = [i for i in parents if i not in vanished]
        if not present and len(parents) > 1:
            continue  # two populations gone to one new place: they merged
        if all(significant[i].any() for i in present):
            born.add(j)
    return born


def segment_transitions(
    previous: np.ndarray, current: np.ndarray, k_previous: int, k_current: int,
    novel: np.ndarray | None = None, retiring: Collection[int] = (),
) -> list[Transition]:
    """Every new segment continues, splits from, merges or is born; every previous segment is
    continued or retired. ``previous``/``current``: each window customer's segment index under
    the previous and the new model; ``novel``: customers beyond the previous model's envelope.

    New segments of customers novel to the previous model are born (``born_segments``);
    previous segments that hold almost only novel customers vanished (``vanished_segments``) and
    parent nothing, nor do the ``retiring`` ones (a refit that dropped them: their customers had
    moved on). A flow
    from old i to new j is significant when it holds at least ``SPLIT_SHARE`` of i's customers
    (not counting those who went to born segments) and of j's, or when i was absorbed by j
    (``absorbed``: most of i's customers went to j). Then a new segment
    with no significant parent is born; with two or more, a merge of them; with one whose only
    significant child it is, the continuation of that parent; with one that has other children
    too, a split of it. A previous segment that no new segment continues is retired.

    Two segments stay, a third splits in two halves, and a population never seen is born:

    >>> prev = np.repeat([0, 1, 2, 0], [100, 100, 100, 40])
    >>> curr = np.repeat([0, 1, 2, 3, 4], [100, 100, 50, 50, 40])
    >>> novel = np.repeat([False, True], [300, 40])
    >>> [(t.status, t.new, t.previous, t.parents) for t in segment_transitions(prev, curr, 3, 5, novel)]
    ... # doctest: +NORMALIZE_WHITESPACE
    [('continued', 0, 0, (0,)), ('continued', 1, 1, (1,)), ('split', 2, None, (2,)),
     ('split', 3, None, (2,)), ('born', 4, None, ()), ('retired', None, 2, ())]

    Two segments merge into one:

    >>> [(t.status, t.new, t.parents) for t in segment_transitions(
    ...     np.repeat([0, 1, 2], 50), np.repeat([0, 0, 1], 50), 3, 2)]
    [('merged', 0, (0, 1)), ('continued', 1, (2,)), ('retired', None, ()), ('retired', None, ())]
    """
    flows = customer_flows(previous, current, k_previous, k_current)
    vanished = vanished_segments(previous, novel, k_previous) | set(retiring)
    born = born_segments(flows, novel_segments(current, novel, k_current), vanished)
    significant = significant_flows(flows, born)
    # a vanished segment that only held part of a new population is its neighbour, not its parent
    strays = [i for i in vanished if any(flows[i, j] > 0 for j in born) or i in retiring]
    significant[strays, :] = False
    children = {i: [int(j) for j in np.flatnonzero(significant[i])] for i in range(k_previous)}
    out: list[Transition] = []
    continued: set[int] = set()
    for j in range(k_current):
        parents = tuple(int(i) for i in np.flatnonzero(significant[:, j]))
        if not parents:
            out.append(Transition("born", j, None))
        elif len(parents) > 1:
            out.append(Transition("merged", j, None, parents))
        elif children[parents[0]] == [j]:
            out.append(Transition("continued", j, parents[0], parents))
            continued.add(parents[0])
        else:
            out.append(Transition("split", j, None, parents))
    out.extend(Transition("retired", None, i) for i in range(k_previous) if i not in continued)
    return out


def vetoed_by_geometry(
    transitions: list[Transition], previous: np.ndarray | None, current: np.ndarray,
    moves: np.ndarray | None, max_spread: float, novel: Collection[int] | None = None,
) -> list[Transition]:
    """Continuations the centroids contradict, the customers notwithstanding:

    * a segment whose centroid moved more than ``max_spread`` (``moves[previous, new]``, in
      spread units over the features that do not age with the calendar), unless its customers
      are the previous segment's own (``novel``: the new segments with more customers beyond the
      previous envelope than the ``ENVELOPE_SHARE`` it leaves out, beyond sampling noise; None
      when the previous model has no envelope, and then the move alone decides), holds other
      customers than the segment it replaces (a population gone, another in its place): the
      old id retires and the new segment is born. The same customers with moved features
      (lapsed customers whose 90-day purchases aged out) continue their segment: the diff says
      ``drifted``;
    * two continued segments that converged (``merged_pairs``) merged, though the new model cut
      the merged population along the old boundary: both are merges of the two.

    >>> t = [Transition("continued", 0, 0, (0,)), Transition("continued", 1, 1, (1,)),
    ...      Transition("continued", 2, 2, (2,))]
    >>> prev = np.array([[0.0], [5.0], [20.0]])
    >>> moves = np.array([[0.1, 9, 9], [9, 0.1, 9], [9, 9, 7.0]])
    >>> [(v.status, v.new, v.previous, v.parents) for v in vetoed_by_geometry(
    ...     t, prev, np.array([[2.0], [3.0], [27.0]]), moves, 3.0)]  # doctest: +NORMALIZE_WHITESPACE
    [('merged', 0, None, (0, 1)), ('merged', 1, None, (0, 1)), ('born', 2, None, ()),
     ('retired', None, 0, ()), ('retired', None, 1, ()), ('retired', None, 2, ())]

    The segment that moved 7 spreads, its customers inside the previous envelope (its features
    moved: purchases that aged out of a window), continues:

    >>> [(v.status, v.new, v.previous) for v in vetoed_by_geometry(
    ...     t, prev, np.array([[2.0], [3.0], [27.0]]), moves, 3.0, novel=set())][2]
    ('continued', 2, 2)
    """
    if previous is None or moves is None:
        return transitions
    continued = [(t.previous, t.new) for t in transitions
                 if t.status == "continued" and t.new is not None and t.previous is not None]
    replaced = {j for i, j in continued if moves[i, j] > max_spread and (novel is None or j in novel)}
    merged = merged_pairs(previous, current, [(i, j, 0.0) for i, j in continued if j not in replaced])
    parents_of = tuple(sorted(i for i, j in continued if j in merged))
    out: list[Transition] = []
    retiring: list[int] = []
    for t in transitions:
        if t.status != "continued" or t.new is None or t.previous is None:
            if t.status != "retired":
                out.append(t)
            elif t.previous is not None:
                retiring.append(t.previous)
        elif t.new in replaced:
            out.append(Transition("born", t.new, None))
            retiring.append(t.previous)
        elif t.new in merged:
            out.append(Transition("merged", t.new, None, parents_of))
            retiring.append(t.previous)
        else:
            out.append(t)
    return out + [Transition("retired", None, i) for i in sorted(retiring)]
