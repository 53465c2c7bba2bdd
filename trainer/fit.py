"""Fitting K-Means on the scaled window, and choosing K, one included.

Inertia always falls as K grows, so it never chooses K alone (it is reported for the elbow
plot). With K chosen (``k = null``), every K in ``k_min..k_max`` is fitted and scored, then:

1. **The silhouette says which K are plausible**: every K whose sampled silhouette is at least
   ``1 - SILHOUETTE_BAND`` of the best one. Cutting a real segment in two costs a lot of
   silhouette, so an over-split K falls out here; but the silhouette's own maximum leans low (it
   prefers merging two segments that sit nearer each other than the rest).
2. **Stability says which of them are real**: a K whose partition changes with the sample of
   customers it is fitted on describes the sample, not the customers. Two K-Means fits on two
   independent subsamples of ``stability_sample`` rows (``STABILITY_PAIRS`` pairs, ``n_init``
   ``STABILITY_N_INIT``) assign a common sample; their adjusted Rand index is the K's stability
   (Lange, Roth, Braun and Buhmann 2004; Ben-Hur, Elisseeff and Guyon 2002). A K needs at least
   ``MIN_STABILITY``. Why not prediction strength (Tibshirani and Walther 2005): it takes the
   minimum over segments, and on the realistic family (quality/realistic.py) its value for a
   2% segment swings between 0.4 and 1.0 from one split to the next.
3. **Calinski-Harabasz bounds, the largest K wins**: among the plausible, stable K, those whose
   Calinski-Harabasz is within ``CH_TOLERANCE`` of the best, and of them the largest. On
   overlapping customer segments the silhouette and Calinski-Harabasz keep falling with K past
   the coarse "recent buyers vs the rest" split, so either index's own maximum merges real
   segments; on well-separated ones Calinski-Harabasz drops sharply past the true K, which is
   what stops the largest K from over-splitting a wide segment that splits stably.
4. **One segment** (``Fit.k == 1``, ``Fit.reason`` says why) when no K in the range is stable:
   a single population cut by K-Means is cut differently by every sample (Gaussian, lognormal and
   Student-t blobs: stability 0.1 to 0.45 at every K of 2..8 with the silhouette's choice).
   Known limit: one strongly elongated population is cut the same way every time, and is
   reported as two segments.
5. **Sticky**: a ``current_k`` (the published model's K) is kept while it still qualifies in
   step 3: sampling noise must not flip K between retrains. A measured change does: the current
   K fell out of the silhouette band, became unstable, or its Calinski-Harabasz fell more than
   ``CH_TOLERANCE`` under the best, and its refit no longer partitions the window as the
   current model does (``MIN_AGREEMENT``; the indices are noisier than the partition); or a
   larger eligible K splits a current segment into parts
   at least ``SPLIT_SEPARATION`` pooled standard deviations apart (``split_evidence``: a
   population that split, or a new one, where a cut through one population measures 2.65).
   The same growth rule applies to a first fit, so a retrain on the same customers lands on the
   same K. ``Fit.reason`` says which K was kept or taken and why.

Cost: the stability fits are on subsamples, so they do not grow with the window (measured in
the report of ``python -m quality``). Measured against the truth in ``docs/model-quality.md``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from segmentation.cluster_metrics import calinski_harabasz, davies_bouldin, sampled_silhouette, shares
from segmentation.matching import cluster_residuals, customer_flows, pair_separation, significant_flows

# A K stays a candidate while its silhouette is within this fraction of the best K's. Sampling
# noise of the silhouette on 5000 rows is about 0.005, far inside the band. Tuned on the
# realistic family's tuning seeds with MIN_STABILITY: 0.15 / 0.20 / 0.25 gave K within +-1 of
# the truth on 67% / 75% / 92% of the sets, mean ARI 0.71 / 0.69 / 0.67.
SILHOUETTE_BAND = 0.25
# Subsample ARI a K needs; single blobs score 0.1 to 0.45 at the K the silhouette prefers, real
# segments 0.83 to 1.0.
MIN_STABILITY = 0.85
STABILITY_PAIRS = 2
STABILITY_N_INIT = 3
# Among the plausible, stable K, those whose Calinski-Harabasz is within this fraction of the
# best are equally good; the largest is chosen, or the current K if it is one of them. Tuning
# seeds: 0.05 / 0.10 / 0.20 gave K within +-1 on 75% / 92% / 92%; 0.15 over-splits a wide
# blob of quality/datasets.py's unequal sets (CH 12% under the true K's).
CH_TOLERANCE = 0.1
# The current K gives way to a larger eligible one when that one cuts a current segment into
# parts at least this many pooled standard deviations apart (``split_evidence``): K-Means cutting
# one population measures about 2.65, overlapping real segments 2.6 to 3.0; a population that
# really split, or a new one far from the rest, more.
SPLIT_SEPARATION = 3.3
# The current K is also kept while the refit at that K (stable) partitions the window's
# customers as the current model does, by at least this adjusted Rand index: the indices'
# noise between two windows of the same customers moves a K across the silhouette band or the
# Calinski-Harabasz tolerance (realistic held-out seeds 1003, 1004), its partition does not.
# Realistic tuning seeds, same segments in both windows: 0.97 to 1.0; two of five
# well-separated populations merged: 0.76 to 0.86.
MIN_AGREEMENT = 0.9
# A current segment holding less of the window than this has lost its population.
VANISHED_SHARE = 0.005
SPLIT_MARGIN = 0.5
MIN_CUT_ROWS = 50
# How a chosen K was chosen, as recorded in the bundle (``quality.k_selection``).
K_SELECTION = (f"the largest K with silhouette within {SILHOUETTE_BAND:.0%} of the best, subsample "
               f"stability (ARI) >= {MIN_STABILITY} and Calinski-Harabasz within {CH_TOLERANCE:.0%} "
               "of the best such K; 1 if no K is stable; the current K kept while it qualifies")


@dataclass(frozen=True)
class Fit:
    centroids: np.ndarray
    labels: np.ndarray
    k: int
    inertia: float
    silhouette: float
    davies_bouldin: float
    calinski_harabasz: float = 0.0
    stability: float = 1.0  # subsample ARI of this K (1 when not measured, and for K=1)
    reason: str = ""  # why this K was chosen (set on the chosen fit)

    @property
    def no_structure(self) -> bool:
        """The chosen outcome is one segment: no segment structure in the window."""
        return self.k == 1

    @property
    def shares(self) -> np.ndarray:
        return shares(self.labels, self.k)

    @property
    def sizes(self) -> list[int]:
        return np.bincount(self.labels, minlength=self.k).tolist()

    def scores(self) -> dict[str, float]:
        return {"k": self.k, "silhouette": self.silhouette, "davies_bouldin": self.davies_bouldin,
                "calinski_harabasz": self.calinski_harabasz, "inertia": self.inertia,
                "stability": self.stability}


@dataclass(frozen=True)
class KConfig:
    """What fitting and choosing K depend on."""

    k: int | None = None  # fixed K; None chooses
    k_min: int = 2
    k_max: int = 10
    n_init: int = 10
    random_state: int = 42
    silhouette_sample: int = 5000
    stability_sample: int = 2000
    # The encoded space is [numeric | one-hot]: split evidence is measured on the first
    # ``numeric_columns`` (None: all). A segment cut along a category has no spread in its
    # one-hot columns, so any cut there would measure as far apart as one likes (the demo's
    # channel: 65 pooled deviations); categories shape segments, they do not prove a split.
    numeric_columns: int | None = None


def fit_kmeans(
    x: np.ndarray, k: int, n_init: int, random_state: int, silhouette_sample: int,
    init: np.ndarray | None = None, max_iter: int = 300,
) -> Fit:
    """k-means++ with ``n_init`` restarts (the best inertia wins), scored on a sample; or, with
    ``init`` (K centroids), one run of Lloyd's algorithm from them (``continued``), of at most
    ``max_iter`` iterations (``recentred``: one)."""
    if init is None:
        model = KMeans(n_clusters=k, init="k-means++", n_init=n_init, random_state=random_state)
    else:
        model = KMeans(n_clusters=k, init=init, n_init=1, random_state=random_state, max_iter=max_iter)
    labels = model.fit_predict(x)
    return Fit(
        centroids=model.cluster_centers_,
        labels=labels,
        k=k,
        inertia=float(model.inertia_),
        silhouette=sampled_silhouette(x, labels, silhouette_sample, random_state),
        davies_bouldin=davies_bouldin(x, labels),
        calinski_harabasz=calinski_harabasz(x, labels),
    )


def continued(x: np.ndarray, centroids: np.ndarray, random_state: int, silhouette_sample: int) -> Fit:
    """The current model's segments refitted on this window: K-Means started from its centroids
    (expressed in the window's space), the local optimum nearest to the segments in use. This is
    the temporal smoothness of evolutionary clustering (Chakrabarti, Kumar and Tomkins, KDD
    2006): the segments follow their customers' drift, and a restructuring is left to a fit from
    scratch and an operator.

    >>> rng = np.random.default_rng(0)
    >>> x = np.vstack([rng.normal(0, 1, (200, 2)), rng.normal(8, 1, (200, 2))])
    >>> fit = continued(x, np.array([[7.0, 7.0], [1.0, 1.0]]), 0, 400)
    >>> fit.k, int(fit.labels[0]), int(fit.labels[-1])  # the order of the current segments is kept
    (2, 1, 0)
    """
    return fit_kmeans(x, centroids.shape[0], 1, random_state, silhouette_sample, init=centroids)


def recentred(x: np.ndarray, centroids: np.ndarray, random_state: int, silhouette_sample: int) -> Fit:
    """The current model's segments moved to the mean of the customers it assigns them in this
    window (one Lloyd iteration from its centroids): no segment is redrawn, so the structure is
    the current one by construction, when ``continued`` converges to another (an ageing segment
    that K-Means now cuts in two). Each customer is then assigned to the nearest moved centroid.

    >>> rng = np.random.default_rng(0)
    >>> x = np.vstack([rng.normal(0, 1, (200, 2)), rng.normal(8, 1, (200, 2))])
    >>> fit = recentred(x, np.array([[7.0, 7.0], [1.0, 1.0]]), 0, 400)
    >>> fit.k, int(fit.labels[0]), int(fit.labels[-1]), bool(abs(fit.centroids[0, 0] - 8) < 0.3)
    (2, 1, 0, True)
    """
    return fit_kmeans(x, centroids.shape[0], 1, random_state, silhouette_sample, init=centroids, max_iter=1)


def plausible(fits: list[Fit]) -> list[Fit]:
    """The fits whose silhouette is within ``SILHOUETTE_BAND`` of the best (relative to it).

    >>> z = np.zeros((1, 1)); l = np.zeros(1, dtype=int)
    >>> [f.k for f in plausible([Fit(z, l, 2, 9.0, 0.58, 0.6), Fit(z, l, 3, 5.0, 0.50, 0.8),
    ...                          Fit(z, l, 4, 4.0, 0.40, 0.9)])]
    [2, 3]
    """
    best = max(f.silhouette for f in fits)
    floor = best - SILHOUETTE_BAND * abs(best)
    return [f for f in fits if f.silhouette >= floor]


def stable(fits: list[Fit]) -> list[Fit]:
    """The fits whose subsample stability is at least ``MIN_STABILITY``.

    >>> z = np.zeros((1, 1)); l = np.zeros(1, dtype=int)
    >>> [f.k for f in stable([Fit(z, l, 2, 9.0, 0.5, 0.6, stability=0.2),
    ...                       Fit(z, l, 3, 5.0, 0.5, 0.8, stability=0.97)])]
    [3]
    """
    return [f for f in fits if f.stability >= MIN_STABILITY]


def eligible(fits: list[Fit]) -> list[Fit]:
    """The plausible, stable fits whose Calinski-Harabasz is within ``CH_TOLERANCE`` of the best
    of them: the K any of which describes the window about as well.

    >>> z = np.zeros((1, 1)); l = np.zeros(1, dtype=int)
    >>> fits = [Fit(z, l, 4, 9.0, 0.76, 0.5, 8100.0, 1.0), Fit(z, l, 5, 5.0, 0.74, 0.5, 9500.0, 1.0),
    ...         Fit(z, l, 6, 4.0, 0.68, 0.6, 8400.0, 1.0)]
    >>> [f.k for f in eligible(fits)]
    [5]
    """
    candidates = stable(plausible(fits))
    if not candidates:
        return []
    top = max(f.calinski_harabasz for f in candidates)
    return [f for f in candidates if f.calinski_harabasz >= (1 - CH_TOLERANCE) * top]


def choose_k(fits: list[Fit], current_k: int | None = None,
             agreement: float | None = None) -> tuple[int | None, str]:
    """The K to publish among scored fits (None: one segment, no structure) and why: the
    largest ``eligible`` K, or ``current_k`` while it is eligible, or while it is stable and
    its refit partitions the window as the current model does (``agreement``, the adjusted
    Rand index between the two, at least ``MIN_AGREEMENT``).

    Overlapping segments: K=3 has the best silhouette but is unstable, K=6 is out of the band;
    K=2, 4 and 5 are stable and within the tolerance of the best Calinski-Harabasz, and the
    largest wins. A current K=4 is kept; a current K=3 (unstable) is not:

    >>> z = np.zeros((1, 1)); l = np.zeros(1, dtype=int)
    >>> fits = [Fit(z, l, 2, 9.0, 0.36, 0.7, 3000.0, 0.99), Fit(z, l, 3, 5.0, 0.40, 0.8, 3100.0, 0.6),
    ...         Fit(z, l, 4, 4.5, 0.34, 0.8, 2950.0, 0.90), Fit(z, l, 5, 4.0, 0.33, 0.9, 2900.0, 0.92),
    ...         Fit(z, l, 6, 3.0, 0.20, 1.1, 2600.0, 0.95)]
    >>> choose_k(fits)[0], choose_k(fits, current_k=4)[0], choose_k(fits, current_k=3)[0]
    (5, 4, 5)

    A current K=6, out of the silhouette band but stable, is kept while its refit partitions
    the customers as the current model does; the unstable K=3 is not, however it agrees:

    >>> choose_k(fits, 6, agreement=0.97)[0], choose_k(fits, 6, agreement=0.8)[0], choose_k(fits, 3, 0.99)[0]
    (6, 5, 5)
    >>> choose_k([Fit(z, l, 2, 9.0, 0.10, 2.0, stability=0.2)])
    (None, 'no stable K in 2..2 (best subsample ARI 0.20 < 0.85): one segment')
    """
    agreeing = next((f for f in fits if f.k == current_k and f.stability >= MIN_STABILITY), None)
    if agreeing is not None and agreement is not None and agreement >= MIN_AGREEMENT:
        return agreeing.k, (f"current K={agreeing.k} kept: stable ({agreeing.stability:.2f}) and its "
                            f"refit partitions the window as the current model does (ARI {agreement:.2f} "
                            f">= {MIN_AGREEMENT})")
    candidates = eligible(fits)
    if not candidates:
        best = max(fits, key=lambda f: f.stability)
        return None, (f"no stable K in {fits[0].k}..{fits[-1].k} (best subsample ARI "
                      f"{best.stability:.2f} < {MIN_STABILITY}): one segment")
    chosen = max(candidates, key=lambda f: f.k)
    current = next((f for f in candidates if f.k == current_k), None)
    if current is not None and current.k != chosen.k:
        return current.k, (f"current K={current.k} kept: plausible, stable ({current.stability:.2f}) "
                           f"and within {CH_TOLERANCE:.0%} of the best Calinski-Harabasz")
    return chosen.k, (f"largest K with silhouette within {SILHOUETTE_BAND:.0%} of the best, "
                      f"stability {chosen.stability:.2f} >= {MIN_STABILITY} and Calinski-Harabasz "
                      f"within {CH_TOLERANCE:.0%} of the best such K")


def split_evidence(x: np.ndarray, smaller: Fit, larger: Fit) -> tuple[float, int]:
    """How clearly the ``larger`` fit splits one of the ``smaller`` fit's segments, and which:
    among the segments of ``smaller`` that the customers show as split (two or more counted
    flows into ``larger``, ``segmentation.matching.significant_flows``), the largest separation
    of two of the parts (``pair_separation``); ``(0, -1)`` when nothing splits.

    >>> rng = np.random.default_rng(0)
    >>> x = np.vstack([rng.normal(0, 1, (300, 2)), rng.normal([6, 0], 1, (300, 2)),
    ...                rng.normal([0, 30], 1, (300, 2))])
    >>> two = Fit(np.zeros((2, 2)), np.repeat([0, 0, 1], 300), 2, 0.0, 0.0, 0.0)
    >>> c = np.array([x[:300].mean(0), x[300:600].mean(0), x[600:].mean(0)])
    >>> three = Fit(c, np.repeat([0, 1, 2], 300), 3, 0.0, 0.0, 0.0)
    >>> evidence, parent = split_evidence(x, two, three)
    >>> evidence > 5, parent
    (True, 0)
    """
    flows = customer_flows(smaller.labels, larger.labels, smaller.k, larger.k)
    significant = significant_flows(flows, set())
    centroids = larger.centroids[:, : x.shape[1]]  # x may be the numeric columns only
    residuals = cluster_residuals(x, larger.labels, centroids)
    best, parent = 0.0, -1
    for i in range(smaller.k):
        parts = np.flatnonzero(significant[i])
        for a, b in itertools.combinations(parts.tolist(), 2):
            separation = pair_separation(residuals, centroids, a, b)
            if separation > best:
                best, parent = separation, i
    return best, parent


def halves_separation(rows: np.ndarray, random_state: int) -> float:
    """How far apart the two halves 2-means cuts one segment into are (``pair_separation``):
    about 2.65 for one normal population, more for a segment that is two.

    >>> rng = np.random.default_rng(0)
    >>> halves_separation(rng.normal(0, 1, (2000, 4)), 0) < 3.0
    True
    """
    model = KMeans(n_clusters=2, n_init=STABILITY_N_INIT, random_state=random_state).fit(rows)
    residuals = cluster_residuals(rows, model.labels_, model.cluster_centers_)
    return pair_separation(residuals, model.cluster_centers_, 0, 1)


def typical_cut(x: np.ndarray, fit: Fit, exclude: int, random_state: int) -> float:
    """The median ``halves_separation`` of the fit's other segments (of at least ``MIN_CUT_ROWS``
    rows): what cutting a segment of this window measures when nothing split. On Gaussian
    populations about 2.7; on realistic segments (zero-inflated counts, refunds) 3 to 5."""
    cuts = [halves_separation(x[fit.labels == j], random_state) for j in range(fit.k)
            if j != exclude and int((fit.labels == j).sum()) >= MIN_CUT_ROWS]
    return float(np.median(cuts)) if cuts else 0.0


def grown_k(x: np.ndarray, fits: list[Fit], kept: int, random_state: int) -> tuple[int, float] | None:
    """The smallest plausible, stable K above the ``kept`` current one that splits a current
    segment clearly, with the evidence; None if none. Clearly: ``split_evidence`` at least
    ``SPLIT_SEPARATION``, and at least ``SPLIT_MARGIN`` above the ``typical_cut`` of the other
    segments: realistic segments, not Gaussian, measure 3.3 to 5.5 when merely cut in two (the
    realistic family's tuning seeds), so the window's own cuts are the yardstick. The split is
    the evidence, so Calinski-Harabasz need not favour the larger K (with the other segments far
    apart it barely moves when one segment splits). ``x``: the columns the evidence is measured
    on (the numeric ones, ``KConfig.numeric_columns``), the first of the fits' space."""
    current = next(f for f in fits if f.k == kept)
    for candidate in sorted((f for f in stable(plausible(fits)) if f.k > kept), key=lambda f: f.k):
        evidence, parent = split_evidence(x, current, candidate)
        if evidence < SPLIT_SEPARATION:
            continue
        if evidence >= typical_cut(x, current, parent, random_state) + SPLIT_MARGIN:
            return candidate.k, evidence
    return None


def subsample_stability(x: np.ndarray, k: int, size: int, random_state: int,
                        pairs: int = STABILITY_PAIRS) -> float:
    """Mean adjusted Rand index between the partitions of a common sample by two K-Means fits on
    two independent subsamples of ``size`` rows (1.0: the same segments whatever the sample).

    >>> rng = np.random.default_rng(0)
    >>> two = np.vstack([rng.normal(0, 1, (400, 2)), rng.normal(8, 1, (400, 2))])
    >>> subsample_stability(two, 2, 300, 0) > 0.95
    True
    >>> blob = rng.normal(0, 1, (800, 8))
    >>> subsample_stability(blob, 2, 300, 0) < 0.5
    True
    """
    rng = np.random.default_rng(random_state)
    size = min(size, x.shape[0])
    scores = []
    for pair in range(pairs):
        a, b, common = (rng.choice(x.shape[0], size=size, replace=False) for _ in range(3))
        labels = [KMeans(n_clusters=k, n_init=STABILITY_N_INIT, random_state=random_state + 2 * pair + i)
                  .fit(x[rows]).predict(x[common]) for i, rows in enumerate((a, b))]
        scores.append(adjusted_rand_score(*labels))
    return float(np.mean(scores))


def agreement_with(fits: list[Fit], current_k: int | None, current_labels: np.ndarray | None) -> float | None:
    """The adjusted Rand index between the current model's partition of the rows and the refit
    at its K; None without a current model or a refit at that K, or when one of the current
    segments holds under ``VANISHED_SHARE`` of the rows: its population is gone, and the refit
    at the current K must cut another one to fill it (which the index barely sees).

    >>> z = np.zeros((1, 1))
    >>> agreement_with([Fit(z, np.array([1, 1, 0, 0]), 2, 0.0, 0.0, 0.0)], 2, np.array([0, 0, 1, 1]))
    1.0
    >>> agreement_with([Fit(z, np.array([1, 1, 0, 0]), 2, 0.0, 0.0, 0.0)], 2, np.array([0, 0, 0, 0]))
    """
    same = next((f for f in fits if f.k == current_k), None)
    if same is None or current_labels is None or current_k is None:
        return None
    held = np.bincount(current_labels, minlength=current_k) / max(current_labels.shape[0], 1)
    if held.min() < VANISHED_SHARE:
        return None
    return float(adjusted_rand_score(current_labels, same.labels))


def one_segment(x: np.ndarray, reason: str) -> Fit:
    """The no-structure outcome: every row in one segment at the mean (silhouette 0,
    Davies-Bouldin and Calinski-Harabasz 0 as undefined)."""
    centre = x.mean(axis=0, keepdims=True)
    return Fit(centroids=centre, labels=np.zeros(x.shape[0], dtype=np.intp), k=1,
               inertia=float(((x - centre) ** 2).sum()), silhouette=0.0, davies_bouldin=0.0,
               calinski_harabasz=0.0, reason=reason)


def fit_model(x: np.ndarray, config: KConfig, current_k: int | None = None,
              current_labels: np.ndarray | None = None) -> tuple[Fit, list[Fit]]:
    """Fit a fixed K, or every K in ``k_min..k_max``, score each (with its stability) and choose
    (``choose_k``); returns the chosen fit (K=1 when there is no segment structure) and every
    scored fit. ``current_labels``: the current model's segment index of each row of ``x``."""
    if config.k is not None:
        fit = fit_kmeans(x, config.k, config.n_init, config.random_state, config.silhouette_sample)
        return replace(fit, reason="fixed"), [fit]
    hi = min(config.k_max, x.shape[0] - 1)
    fits = [replace(fit_kmeans(x, k, config.n_init, config.random_state, config.silhouette_sample),
                    stability=subsample_stability(x, k, config.stability_sample, config.random_state))
            for k in range(config.k_min, hi + 1)]
    k, reason = choose_k(fits, current_k, agreement_with(fits, current_k, current_labels))
    if k is None:
        return one_segment(x, reason), fits
    # The same rule for a first fit as for a kept current K: a retrain on the same customers
    # then lands on the same K.
    if (grown := grown_k(x[:, : config.numeric_columns], fits, k, config.random_state)) is not None:
        k, reason = grown[0], (f"K {k} -> {grown[0]}: a segment of K={k} splits into parts "
                               f"{grown[1]:.1f} pooled standard deviations apart (>= {SPLIT_SEPARATION})")
    return replace(next(f for f in fits if f.k == k), reason=reason), fits
