"""Fitting K-Means on the scaled window, and choosing K.

Inertia always falls as K grows, so it never chooses K alone (it is reported for the elbow
plot). K is chosen in two steps, each by the index that is good at that step:

1. **The silhouette says which K are plausible**: every K whose sampled silhouette is at least
   ``1 - SILHOUETTE_BAND`` (85%) of the best one. Splitting a real cluster in two costs a lot of
   silhouette, so an over-split K falls out here; but the silhouette's own maximum leans low: it
   prefers merging two clusters that sit nearer each other than the rest (iris' two overlapping
   species, two segments close in a layout of five), because merging them barely worsens the
   nearest-other-cluster distance of everybody else.
2. **Calinski-Harabasz picks among them**: the ratio of between- to within-cluster dispersion,
   each per degree of freedom (the best of the 30 stopping rules compared by Milligan and Cooper,
   1985). It does not lean low on nested structure, but alone it can run to an extreme K: to 2
   where clusters are not compact (handwritten digits), to the largest K when a few extreme rows
   reach the fit (they get segments of their own). Step 1 rules those out.

Both are cheap next to the fits: the silhouette is computed on a stratified sample
(``silhouette_sample`` rows), Calinski-Harabasz and Davies-Bouldin in one pass over the rows.
Measured against the truth in ``docs/model-quality.md`` (``python -m quality``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.cluster import KMeans

from segmentation.cluster_metrics import calinski_harabasz, davies_bouldin, sampled_silhouette, shares

# A K stays a candidate while its silhouette is within this fraction of the best K's. Sampling
# noise of the silhouette on 5000 rows is about 0.005, far inside the band.
SILHOUETTE_BAND = 0.15
# How a chosen K was chosen, as recorded in the bundle (``quality.k_selection``).
K_SELECTION = f"silhouette within {SILHOUETTE_BAND:.0%} of the best, then the highest Calinski-Harabasz"


@dataclass(frozen=True)
class Fit:
    centroids: np.ndarray
    labels: np.ndarray
    k: int
    inertia: float
    silhouette: float
    davies_bouldin: float
    calinski_harabasz: float = 0.0

    @property
    def shares(self) -> np.ndarray:
        return shares(self.labels, self.k)

    @property
    def sizes(self) -> list[int]:
        return np.bincount(self.labels, minlength=self.k).tolist()

    def scores(self) -> dict[str, float]:
        return {"k": self.k, "silhouette": self.silhouette, "davies_bouldin": self.davies_bouldin,
                "calinski_harabasz": self.calinski_harabasz, "inertia": self.inertia}


def fit_kmeans(
    x: np.ndarray, k: int, n_init: int, random_state: int, silhouette_sample: int
) -> Fit:
    """k-means++ with ``n_init`` restarts (the best inertia wins), scored on a sample."""
    model = KMeans(n_clusters=k, init="k-means++", n_init=n_init, random_state=random_state)
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


def plausible(fits: list[Fit]) -> list[Fit]:
    """The fits whose silhouette is within ``SILHOUETTE_BAND`` of the best (relative to it).

    >>> z = np.zeros((1, 1)); l = np.zeros(1, dtype=int)
    >>> [f.k for f in plausible([Fit(z, l, 2, 9.0, 0.58, 0.6), Fit(z, l, 3, 5.0, 0.50, 0.8),
    ...                          Fit(z, l, 4, 4.0, 0.46, 0.9)])]
    [2, 3]
    """
    best = max(f.silhouette for f in fits)
    floor = best - SILHOUETTE_BAND * abs(best)
    return [f for f in fits if f.silhouette >= floor]


def choose_k(fits: list[Fit]) -> Fit:
    """Among the plausible fits, the highest Calinski-Harabasz (ties: the smaller K).

    Five segments, two of them close: the silhouette's maximum is at K=4 (the two merged), but
    K=5 is within the band and separates them better per degree of freedom. K=6 has the highest
    Calinski-Harabasz here, but its silhouette is out of the band (a real cluster cut in two):

    >>> z = np.zeros((1, 1)); l = np.zeros(1, dtype=int)
    >>> fits = [Fit(z, l, 4, 9.0, 0.52, 0.7, 3400.0), Fit(z, l, 5, 5.0, 0.47, 0.8, 3900.0),
    ...         Fit(z, l, 6, 4.0, 0.40, 1.1, 4100.0)]
    >>> choose_k(fits).k
    5
    """
    return max(plausible(fits), key=lambda f: (f.calinski_harabasz, -f.k))


def fit_model(
    x: np.ndarray,
    k: int | None,
    k_range: tuple[int, int],
    n_init: int,
    random_state: int,
    silhouette_sample: int,
) -> tuple[Fit, list[Fit]]:
    """Fit a fixed K, or every K in ``k_range`` and choose; returns the chosen fit and all."""
    if k is not None:
        fit = fit_kmeans(x, k, n_init, random_state, silhouette_sample)
        return fit, [fit]
    lo, hi = k_range
    hi = min(hi, x.shape[0] - 1)
    fits = [fit_kmeans(x, kk, n_init, random_state, silhouette_sample) for kk in range(lo, hi + 1)]
    return choose_k(fits), fits
