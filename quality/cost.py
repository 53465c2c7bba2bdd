"""What choosing K costs on a large window: one K-Means fit against the three scores computed
for every K (the sampled silhouette, Davies-Bouldin and Calinski-Harabasz)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sklearn.cluster import KMeans

from quality.datasets import SEPARATION, gaussian_rows, separated_centres
from segmentation.cluster_metrics import calinski_harabasz, davies_bouldin, sampled_silhouette
from segmentation.settings import Settings

COST_ROWS = 100_000
COST_K = 5


@dataclass(frozen=True)
class Cost:
    rows: int
    fit_s: float  # one KMeans fit, n_init restarts
    silhouette_s: float
    davies_bouldin_s: float
    calinski_harabasz_s: float


def timed(step: Callable[[], object]) -> float:
    started = time.perf_counter()
    step()
    return time.perf_counter() - started


def scoring_cost(settings: Settings, rows: int = COST_ROWS) -> Cost:
    """Seconds per K on ``rows`` customers in six features (five equal blobs)."""
    rng = np.random.default_rng(0)
    spreads = np.ones(COST_K)
    sizes = np.full(COST_K, rows // COST_K)
    x, _ = gaussian_rows(rng, separated_centres(rng, COST_K, spreads, SEPARATION, 10.0), spreads, sizes)
    model = KMeans(COST_K, n_init=settings.n_init, random_state=settings.random_state)
    fit_s = timed(lambda: model.fit(x))
    labels = model.labels_
    return Cost(
        rows=rows, fit_s=fit_s,
        silhouette_s=timed(lambda: sampled_silhouette(x, labels, settings.silhouette_sample,
                                                      settings.random_state)),
        davies_bouldin_s=timed(lambda: davies_bouldin(x, labels)),
        calinski_harabasz_s=timed(lambda: calinski_harabasz(x, labels)),
    )
