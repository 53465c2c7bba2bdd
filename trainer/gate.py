"""The quality gate: a refit that collapsed (a tiny segment, two near-identical centroids, a
silhouette well below the current model's on the same window, a non-finite number) is refused
and the current model stays."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial.distance import pdist


@dataclass(frozen=True)
class GateFailure:
    check: str  # finite | min_share | separation | silhouette
    value: float
    limit: float
    detail: str


def check_finite(centroids: np.ndarray, silhouette: float) -> GateFailure | None:
    """Centroids and silhouette must be finite numbers.

    >>> check_finite(np.array([[np.nan]]), 0.5).check
    'finite'
    """
    if np.isfinite(centroids).all() and np.isfinite(silhouette):
        return None
    return GateFailure("finite", float("nan"), 0.0, "non-finite centroid or silhouette")


def check_finite_window(x: np.ndarray, center: list[float], scale: list[float]) -> GateFailure | None:
    """The scaled training matrix and the scaler must be finite before anything is fitted.

    Every feature value is finite (the decoder refuses NaN and infinity), yet a few absurd ones
    (``1e308``) overflow the scaler's mean and variance, and every scaled row becomes NaN.

    >>> check_finite_window(np.ones((2, 1)), [1e308], [float("inf")]).detail
    'the scaler or the scaled window is not finite (an absurdly large feature value?)'
    >>> check_finite_window(np.ones((2, 1)), [1.0], [1.0]) is None
    True
    """
    if np.isfinite(x).all() and np.isfinite(center).all() and np.isfinite(scale).all():
        return None
    return GateFailure(
        "finite", float("nan"), 0.0,
        "the scaler or the scaled window is not finite (an absurdly large feature value?)",
    )


def check_min_share(shares: np.ndarray, floor: float) -> GateFailure | None:
    """The smallest segment's share of the window must reach the floor.

    >>> check_min_share(np.array([0.995, 0.005]), 0.01).detail
    'segment index 1 holds 0.50% of the window (floor 1.00%)'
    """
    i = int(np.argmin(shares))
    if shares[i] >= floor:
        return None
    return GateFailure(
        "min_share", float(shares[i]), floor,
        f"segment index {i} holds {shares[i]:.2%} of the window (floor {floor:.2%})",
    )


def check_separation(centroids: np.ndarray, min_fraction: float) -> GateFailure | None:
    """Closest pair of centroids relative to the median centroid distance.

    >>> check_separation(np.array([[0.0], [0.1], [10.0], [20.0]]), 0.2).check
    'separation'
    >>> check_separation(np.array([[0.0], [10.0], [20.0]]), 0.2) is None
    True
    """
    if centroids.shape[0] < 2:
        return None
    d = pdist(centroids)
    median = float(np.median(d))
    ratio = float(d.min() / median) if median > 0 else 0.0
    if ratio >= min_fraction:
        return None
    return GateFailure(
        "separation", ratio, min_fraction,
        f"two centroids are {ratio:.3f} x the median centroid distance apart",
    )


def check_silhouette(new: float, current: float | None, margin: float) -> GateFailure | None:
    """The new silhouette must not fall more than ``margin`` below the current model's.

    >>> check_silhouette(0.40, 0.60, 0.05).check
    'silhouette'
    >>> check_silhouette(0.58, 0.60, 0.05) is None
    True
    """
    if current is None or new >= current - margin:
        return None
    return GateFailure(
        "silhouette", new, current - margin,
        f"silhouette {new:.3f} vs current model {current:.3f} on the same window (margin {margin})",
    )


def run_gate(
    centroids: np.ndarray,
    shares: np.ndarray,
    silhouette: float,
    current_silhouette: float | None,
    min_share: float,
    min_separation: float,
    silhouette_margin: float,
) -> list[GateFailure]:
    """Every failed check (an empty list passes)."""
    checks = [
        check_finite(centroids, silhouette),
        check_min_share(shares, min_share),
        check_separation(centroids, min_separation),
        check_silhouette(silhouette, current_silhouette, silhouette_margin),
    ]
    return [c for c in checks if c is not None]
