"""Assigning points to centroids and the clustering-quality figures built on it."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import calinski_harabasz_score, davies_bouldin_score, silhouette_score


def nearest_two(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index of the nearest centroid, its distance, and the distance to the second nearest.

    Vectorised: one matrix product for the whole batch.

    >>> idx, d1, d2 = nearest_two(np.array([[0.0, 0.0], [9.0, 0.0]]),
    ...                           np.array([[1.0, 0.0], [10.0, 0.0]]))
    >>> idx.tolist(), d1.tolist(), d2.tolist()
    ([0, 1], [1.0, 1.0], [10.0, 8.0])
    """
    sq = (
        np.einsum("ij,ij->i", x, x)[:, None]
        - 2.0 * x @ centroids.T
        + np.einsum("ij,ij->i", centroids, centroids)[None, :]
    )
    np.maximum(sq, 0.0, out=sq)  # rounding can make tiny squared distances negative
    if centroids.shape[0] == 1:
        idx = np.zeros(x.shape[0], dtype=np.intp)
        d1 = np.sqrt(sq[:, 0])
        return idx, d1, np.full_like(d1, np.inf)
    two = np.argpartition(sq, 1, axis=1)[:, :2]
    rows = np.arange(x.shape[0])
    first, second = sq[rows, two[:, 0]], sq[rows, two[:, 1]]
    swap = second < first
    idx = np.where(swap, two[:, 1], two[:, 0])
    d1 = np.sqrt(np.where(swap, second, first))
    d2 = np.sqrt(np.where(swap, first, second))
    return idx, d1, d2


def simplified_silhouette(d1: np.ndarray, d2: np.ndarray) -> np.ndarray:
    """Per-point simplified silhouette ``(b - a) / max(a, b)`` from centroid distances.

    ``a`` is the distance to the own centroid, ``b`` to the second nearest: a cheap stand-in for
    the true silhouette that needs no pairwise distances (Hruschka et al.).

    >>> simplified_silhouette(np.array([1.0, 0.0]), np.array([4.0, 0.0])).tolist()
    [0.75, 0.0]
    """
    denom = np.maximum(d1, d2)
    with np.errstate(invalid="ignore", divide="ignore"):
        s = (d2 - d1) / denom
    return np.where(denom > 0, s, 0.0)


def stratified_sample(labels: np.ndarray, size: int, random_state: int) -> np.ndarray:
    """Row indices of a sample of about ``size`` rows, stratified by label so that small
    clusters keep at least a few rows (silhouette on a plain sample can miss them).

    >>> labels = np.array([0] * 990 + [1] * 10)
    >>> idx = stratified_sample(labels, 100, 0)
    >>> int((labels[idx] == 1).sum()) >= 5
    True
    """
    n = labels.shape[0]
    if n <= size:
        return np.arange(n)
    rng = np.random.default_rng(random_state)
    chosen = []
    values, counts = np.unique(labels, return_counts=True)
    for value, count in zip(values, counts, strict=True):
        members = np.flatnonzero(labels == value)
        take = min(count, max(int(round(size * count / n)), 10))
        chosen.append(rng.choice(members, size=take, replace=False))
    return np.sort(np.concatenate(chosen))


def sampled_silhouette(x: np.ndarray, labels: np.ndarray, size: int, random_state: int) -> float:
    """Mean silhouette on a stratified sample; 0 for a single cluster (undefined there)."""
    if np.unique(labels).shape[0] < 2:
        return 0.0
    idx = stratified_sample(labels, size, random_state)
    if np.unique(labels[idx]).shape[0] < 2:
        return 0.0
    return float(silhouette_score(x[idx], labels[idx]))


def silhouette_noise(x: np.ndarray, labels: np.ndarray, size: int, random_state: int,
                     draws: int = 5) -> float:
    """How much the sampled silhouette of one partition varies between samples of customers
    (the standard deviation over ``draws`` samples): the window's own stationary variability,
    which the gate's allowed drops are never tighter than. 0 for a single cluster.

    >>> rng = np.random.default_rng(0)
    >>> x = np.vstack([rng.normal(0, 1, (500, 2)), rng.normal(3, 1, (500, 2))])
    >>> labels = np.repeat([0, 1], 500)
    >>> 0 < silhouette_noise(x, labels, 200, 0) < 0.05
    True
    """
    if np.unique(labels).shape[0] < 2:
        return 0.0
    values = [sampled_silhouette(x, labels, size, random_state + d) for d in range(draws)]
    return float(np.std(values, ddof=1))


# Excess kurtosis of a uniform distribution is -1.2; a normal's 0. A feature this flat spreads
# its customers evenly, and K-Means cuts it into slices at quantiles (join-date cohorts).
NEAR_UNIFORM_KURTOSIS = -1.0
# Two features this correlated (after the preprocessing) say the same thing twice: 90- and
# 365-day counts of the same purchases.
DUPLICATE_CORRELATION = 0.9


def feature_warnings(x: np.ndarray, names: list[str]) -> list[str]:
    """Features a segmentation should not lean on, as the scaled training rows show them:
    near-uniform ones (excess kurtosis under ``NEAR_UNIFORM_KURTOSIS``: K-Means slices them
    into cohorts that are not segments) and pairs that repeat each other (correlation above
    ``DUPLICATE_CORRELATION``: the pair counts twice in every distance).

    >>> rng = np.random.default_rng(0)
    >>> count = rng.normal(0, 1, 2000)
    >>> x = np.column_stack([rng.uniform(0, 1, 2000), count, count + rng.normal(0, 0.1, 2000)])
    >>> feature_warnings(x, ["tenure", "f90", "f365"])  # doctest: +NORMALIZE_WHITESPACE
    ['tenure is near-uniform (excess kurtosis -1.17): K-Means slices it into cohorts',
     'f90 and f365 repeat each other (correlation 1.00)']
    """
    warnings = []
    spread = x.std(axis=0)
    centred = x - x.mean(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        kurtosis = (centred ** 4).mean(axis=0) / spread ** 4 - 3.0
        correlation = np.corrcoef(x, rowvar=False) if x.shape[1] > 1 else np.ones((1, 1))
    for name, k, s in zip(names, kurtosis, spread, strict=True):
        if s > 0 and np.isfinite(k) and k < NEAR_UNIFORM_KURTOSIS:
            warnings.append(f"{name} is near-uniform (excess kurtosis {k:.2f}): "
                            "K-Means slices it into cohorts")
    for i, j in zip(*np.triu_indices(len(names), k=1), strict=True):
        if np.isfinite(correlation[i, j]) and abs(correlation[i, j]) > DUPLICATE_CORRELATION:
            warnings.append(f"{names[i]} and {names[j]} repeat each other "
                            f"(correlation {correlation[i, j]:.2f})")
    return warnings


# An event further from its centroid than this multiple of the segment's 99th-percentile
# training distance is an outlier: flagged, counted, and never learned from.
OUTLIER_RADIUS_FACTOR = 2.0


def segment_radii(x: np.ndarray, labels: np.ndarray, centroids: np.ndarray,
                  quantile: float = 0.99) -> list[float]:
    """Per segment index, the ``quantile`` of its rows' distance to its centroid (0 for an empty
    segment): the envelope an event beyond which is novel to the segment.

    >>> segment_radii(np.array([[0.0], [1.0], [3.0], [10.0]]), np.array([0, 0, 0, 1]),
    ...               np.array([[0.0], [10.0]]), quantile=1.0)
    [3.0, 0.0]
    """
    distances = np.linalg.norm(x - centroids[labels], axis=1)
    return [float(np.quantile(distances[labels == j], quantile)) if np.any(labels == j) else 0.0
            for j in range(centroids.shape[0])]


def davies_bouldin(x: np.ndarray, labels: np.ndarray) -> float:
    """Davies-Bouldin index (lower is better); ``inf`` for a single cluster."""
    if np.unique(labels).shape[0] < 2:
        return float("inf")
    return float(davies_bouldin_score(x, labels))


def calinski_harabasz(x: np.ndarray, labels: np.ndarray) -> float:
    """Calinski-Harabasz variance ratio (between- over within-cluster dispersion, each per degree
    of freedom; higher is better); 0 for a single cluster. Linear in the rows: no sample needed.

    >>> x = np.array([[0.0], [1.0], [10.0], [11.0]])
    >>> calinski_harabasz(x, np.array([0, 0, 1, 1]))
    200.0
    """
    if np.unique(labels).shape[0] < 2:
        return 0.0
    return float(calinski_harabasz_score(x, labels))


def shares(labels: np.ndarray, k: int) -> np.ndarray:
    """Fraction of points per cluster index 0..k-1.

    >>> shares(np.array([0, 0, 2, 2]), 3).tolist()
    [0.5, 0.0, 0.5]
    """
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    return counts / max(counts.sum(), 1.0)


def population_stability_index(actual: np.ndarray, expected: np.ndarray) -> float:
    """PSI between two share vectors; empty bins are floored at 1e-4 to keep it finite.

    >>> round(population_stability_index(np.array([0.5, 0.5]), np.array([0.5, 0.5])), 6)
    0.0
    >>> population_stability_index(np.array([0.9, 0.1]), np.array([0.5, 0.5])) > 0.25
    True
    """
    a = np.clip(actual, 1e-4, None)
    e = np.clip(expected, 1e-4, None)
    return float(np.sum((a - e) * np.log(a / e)))
