"""Fitting K-Means on the scaled window, and choosing K.

Inertia always falls as K grows, so it never chooses K alone: K is chosen by the sampled
silhouette (stratified by cluster), with Davies-Bouldin breaking near-ties; inertia is
reported for the elbow plot.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.cluster import KMeans

from segmentation.scoring import davies_bouldin, sampled_silhouette, shares

# Silhouettes closer than this are a tie; the lower Davies-Bouldin wins it.
SILHOUETTE_TIE = 0.01


@dataclass(frozen=True)
class Fit:
    centroids: np.ndarray
    labels: np.ndarray
    k: int
    inertia: float
    silhouette: float
    davies_bouldin: float

    @property
    def shares(self) -> np.ndarray:
        return shares(self.labels, self.k)

    @property
    def sizes(self) -> list[int]:
        return np.bincount(self.labels, minlength=self.k).tolist()

    def scores(self) -> dict[str, float]:
        return {"k": self.k, "silhouette": self.silhouette,
                "davies_bouldin": self.davies_bouldin, "inertia": self.inertia}


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
    )


def choose_k(fits: list[Fit]) -> Fit:
    """The best silhouette; among fits within ``SILHOUETTE_TIE`` of it, the lowest
    Davies-Bouldin.

    >>> z = np.zeros((1, 1)); l = np.zeros(1, dtype=int)
    >>> fits = [Fit(z, l, 3, 9.0, 0.70, 0.5), Fit(z, l, 4, 5.0, 0.705, 0.6),
    ...         Fit(z, l, 5, 1.0, 0.4, 0.9)]
    >>> choose_k(fits).k
    3
    """
    best = max(f.silhouette for f in fits)
    near = [f for f in fits if f.silhouette >= best - SILHOUETTE_TIE]
    return min(near, key=lambda f: (f.davies_bouldin, f.k))


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
