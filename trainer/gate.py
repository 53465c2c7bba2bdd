"""The quality gate: a refit that collapsed is refused and the current model stays.

A refit is compared with three references, because none suffices alone:

* **itself**: no tiny segment, no two near-identical centroids, no non-finite number;
* **absolute floors**: a silhouette floor, a Davies-Bouldin ceiling, and a minimum separation of
  the two closest segments in units of their own spread (K-Means cutting one population in two
  leaves halves about 2.65 within-cluster standard deviations apart, whatever the scale);
* **memory**: the current model on the same window, at equal K (does the refit partition
  today's customers worse than the model in use?), and the quality of the **anchor**: the last
  model an operator accepted, or the first model (``segmentation.baseline``). When the data
  itself collapses, the current model and the refit look equally bad on the same window; only
  the remembered anchor shows the fall. Measured against the anchor, with a total budget, a
  collapse cut into many small steps is caught like one jump;
* **structure**: a retrain that splits, merges, gives birth to or retires segments moving more
  than a share of the customers needs an operator's ``--accept``.

Allowed drops come from the data too: never tighter than ``NOISE_SIGMAS`` times the window's own
sampling noise of the silhouette (``segmentation.cluster_metrics.silhouette_noise``), and the
budget is a fraction of the anchor's silhouette, so overlapping real segments (silhouette 0.2)
and well separated ones (0.7) are held to the same relative standard.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from scipy.spatial.distance import pdist

from segmentation.baseline import QualityBaseline
from segmentation.domain import GateCheck
from segmentation.matching import cluster_residuals, pair_separation
from trainer.fit import Fit

# A drop within this many standard deviations of the silhouette's sampling noise is noise.
NOISE_SIGMAS = 3.0


@dataclass(frozen=True)
class GateFailure:
    check: GateCheck
    value: float
    limit: float
    detail: str


@dataclass(frozen=True)
class GateLimits:
    """What a refit must reach (``SEG_GATE_*``; the defaults are the settings'). ``None``
    switches a check off."""

    min_share: float
    min_separation: float
    silhouette_margin: float
    min_spread_separation: float | None
    min_silhouette: float | None
    max_davies_bouldin: float | None
    max_silhouette_drop: float | None
    max_davies_bouldin_rise: float | None
    silhouette_budget: float | None = None
    max_structural_share: float | None = None


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


def spread_separation(x: np.ndarray, labels: np.ndarray, centroids: np.ndarray) -> tuple[float, int, int]:
    """The two closest segments in spread units: the distance between their centroids in
    standard deviations of their pooled within-cluster covariance (Fisher's separation, the
    Mahalanobis distance); and which pair.

    Scale-free, and it tells a real boundary from a cut: K-Means cutting one normal population
    in two leaves halves 1.6 standard deviations apart, each spread 0.6 of one along the cut,
    so about 2.65 units; two populations that are really distinct are much further apart.

    >>> rng = np.random.default_rng(0)
    >>> blob = rng.normal(0.0, 1.0, (4000, 2))
    >>> halves = (blob[:, 0] > 0).astype(int)
    >>> cut = np.array([blob[halves == 0].mean(0), blob[halves == 1].mean(0)])
    >>> round(spread_separation(blob, halves, cut)[0], 2)
    2.65
    >>> two = np.vstack([blob, blob + [8.0, 0.0]]); labels = np.repeat([0, 1], 4000)
    >>> round(spread_separation(two, labels, np.array([[0.0, 0.0], [8.0, 0.0]]))[0])
    8
    """
    residuals = cluster_residuals(x, labels, centroids)
    best, pair = float("inf"), (0, 0)
    for i, j in itertools.combinations(range(centroids.shape[0]), 2):
        ratio = pair_separation(residuals, centroids, i, j)
        if ratio < best:
            best, pair = ratio, (i, j)
    return best, pair[0], pair[1]


def check_spread_separation(
    x: np.ndarray, labels: np.ndarray, centroids: np.ndarray, floor: float | None
) -> GateFailure | None:
    """The two closest segments must be at least ``floor`` pooled within-cluster standard
    deviations apart (see ``spread_separation``).

    >>> rng = np.random.default_rng(1)
    >>> blob = rng.normal(0.0, 1.0, (2000, 2)); halves = (blob[:, 1] > 0).astype(int)
    >>> cut = np.array([blob[halves == 0].mean(0), blob[halves == 1].mean(0)])
    >>> check_spread_separation(blob, halves, cut, 3.0).detail
    'segment indexes 0 and 1 are 2.61 within-cluster std devs apart (floor 3.0): one population cut in two?'
    """
    if floor is None or centroids.shape[0] < 2:
        return None
    ratio, i, j = spread_separation(x, labels, centroids)
    if ratio >= floor:
        return None
    return GateFailure(
        "spread_separation", ratio, floor,
        f"segment indexes {i} and {j} are {ratio:.2f} within-cluster std devs apart "
        f"(floor {floor}): one population cut in two?",
    )


def check_min_silhouette(silhouette: float, floor: float | None) -> GateFailure | None:
    """An absolute silhouette floor.

    >>> check_min_silhouette(0.21, 0.25).detail
    'silhouette 0.210 is below the floor 0.25'
    >>> check_min_silhouette(0.21, None) is None
    True
    """
    if floor is None or silhouette >= floor:
        return None
    return GateFailure("min_silhouette", silhouette, floor,
                       f"silhouette {silhouette:.3f} is below the floor {floor}")


def check_max_davies_bouldin(davies_bouldin: float, ceiling: float | None) -> GateFailure | None:
    """An absolute Davies-Bouldin ceiling (lower is better).

    >>> check_max_davies_bouldin(1.9, 1.5).detail
    'Davies-Bouldin 1.900 is above the ceiling 1.5'
    """
    if ceiling is None or davies_bouldin <= ceiling:
        return None
    return GateFailure("max_davies_bouldin", davies_bouldin, ceiling,
                       f"Davies-Bouldin {davies_bouldin:.3f} is above the ceiling {ceiling}")


def check_silhouette(new: float, current: float | None, margin: float,
                     noise: float = 0.0) -> GateFailure | None:
    """The new silhouette (at the current model's K) must not fall more than ``margin`` (or
    ``NOISE_SIGMAS`` x the silhouette's sampling ``noise``, if larger) below the current model's
    on the same window.

    >>> check_silhouette(0.40, 0.60, 0.05).check
    'silhouette'
    >>> check_silhouette(0.58, 0.60, 0.05) is None
    True
    >>> check_silhouette(0.52, 0.60, 0.05, noise=0.03) is None
    True
    """
    allowed = max(margin, NOISE_SIGMAS * noise)
    if current is None or new >= current - allowed:
        return None
    return GateFailure(
        "silhouette", new, current - allowed,
        f"silhouette {new:.3f} vs current model {current:.3f} on the same window at equal K "
        f"(allowed drop {allowed:.3f})",
    )


def _accepted(baseline: QualityBaseline) -> str:
    return "the last accepted model" + (f" (v{baseline.version})" if baseline.version is not None else "")


def silhouette_allowance(anchor: float, max_drop: float | None, budget: float | None,
                         noise: float) -> float | None:
    """The total silhouette drop allowed below the anchor: ``max_drop``, or ``budget`` x the
    anchor's silhouette if smaller, never under ``NOISE_SIGMAS`` x the sampling noise. None: off.

    >>> silhouette_allowance(0.7, 0.1, 0.3, 0.005), silhouette_allowance(0.2, 0.1, 0.3, 0.005)
    (0.1, 0.06)
    >>> round(silhouette_allowance(0.2, 0.1, 0.3, 0.03), 3)
    0.09
    """
    limits = [v for v in (max_drop, None if budget is None else budget * abs(anchor)) if v is not None]
    if not limits:
        return None
    return max(min(limits), NOISE_SIGMAS * noise)


def check_silhouette_drop(
    new: float, baseline: QualityBaseline | None, max_drop: float | None,
    budget: float | None = None, noise: float = 0.0,
) -> GateFailure | None:
    """The new silhouette must not fall below the anchor's (the silhouette the last accepted
    model had on its own training window) by more than ``silhouette_allowance``: a total
    budget, so that ten small steps are refused like one jump.

    >>> check_silhouette_drop(0.29, QualityBaseline(0.77, 0.34, 1), 0.1).detail
    'silhouette 0.290 vs 0.770 of the last accepted model (v1) on its training window (allowed drop 0.100)'
    >>> check_silhouette_drop(0.70, QualityBaseline(0.77, 0.34, 1), 0.1) is None
    True
    >>> check_silhouette_drop(0.15, QualityBaseline(0.22, 1.4, 1), 0.1, budget=0.3).check
    'silhouette_drop'
    """
    if baseline is None:
        return None
    allowed = silhouette_allowance(baseline.silhouette, max_drop, budget, noise)
    if allowed is None or new >= baseline.silhouette - allowed:
        return None
    return GateFailure(
        "silhouette_drop", new, baseline.silhouette - allowed,
        f"silhouette {new:.3f} vs {baseline.silhouette:.3f} of {_accepted(baseline)} on its "
        f"training window (allowed drop {allowed:.3f})",
    )


def check_structure(structural_share: float | None, limit: float | None) -> GateFailure | None:
    """A retrain that splits, merges, gives birth to or retires segments may move at most
    ``limit`` of the customers without an operator's ``--accept``.

    >>> check_structure(0.12, 0.05).detail
    'splits, merges, births and retirements move 12.0% of the customers (limit 5.0%): --accept to publish'
    >>> check_structure(0.01, 0.05) is None, check_structure(None, 0.05) is None
    (True, True)
    """
    if structural_share is None or limit is None or structural_share <= limit:
        return None
    return GateFailure(
        "structure", structural_share, limit,
        f"splits, merges, births and retirements move {structural_share:.1%} of the customers "
        f"(limit {limit:.1%}): --accept to publish",
    )


def check_davies_bouldin_rise(
    new: float, baseline: QualityBaseline | None, max_rise: float | None
) -> GateFailure | None:
    """The new Davies-Bouldin index must not rise more than ``max_rise`` above the last
    accepted model's on its own training window.

    >>> check_davies_bouldin_rise(1.24, QualityBaseline(0.77, 0.34, 1), 0.3).detail
    'Davies-Bouldin 1.240 vs 0.340 of the last accepted model (v1) on its training window (max rise 0.3)'
    """
    if baseline is None or max_rise is None or new <= baseline.davies_bouldin + max_rise:
        return None
    return GateFailure(
        "davies_bouldin_rise", new, baseline.davies_bouldin + max_rise,
        f"Davies-Bouldin {new:.3f} vs {baseline.davies_bouldin:.3f} of {_accepted(baseline)} on "
        f"its training window (max rise {max_rise})",
    )


def run_gate(
    fit: Fit,
    x: np.ndarray,
    limits: GateLimits,
    current_silhouette: float | None = None,
    baseline: QualityBaseline | None = None,
    *,
    equal_k_silhouette: float | None = None,
    noise: float = 0.0,
    structural_share: float | None = None,
) -> list[GateFailure]:
    """Every failed check (an empty list passes). ``current_silhouette``: the current model's
    partition of the same window, scored in the refit's space, compared with
    ``equal_k_silhouette`` (the refit at the current model's K; the refit's own when None);
    ``baseline``: the anchor's training quality (None for the first model: only the floors
    apply); ``noise``: the silhouette's sampling noise on this window; ``structural_share``: the
    customers a structural change moves (None before matching)."""
    not_finite = check_finite(fit.centroids, fit.silhouette)
    if not_finite is not None:
        return [not_finite]  # nothing else can be measured on NaN
    checks = [
        check_min_share(fit.shares, limits.min_share),
        check_separation(fit.centroids, limits.min_separation),
        check_spread_separation(x, fit.labels, fit.centroids, limits.min_spread_separation),
        check_min_silhouette(fit.silhouette, limits.min_silhouette),
        check_max_davies_bouldin(fit.davies_bouldin, limits.max_davies_bouldin),
        check_silhouette(fit.silhouette if equal_k_silhouette is None else equal_k_silhouette,
                         current_silhouette, limits.silhouette_margin, noise),
        check_silhouette_drop(fit.silhouette, baseline, limits.max_silhouette_drop,
                              limits.silhouette_budget, noise),
        check_davies_bouldin_rise(fit.davies_bouldin, baseline, limits.max_davies_bouldin_rise),
        check_structure(structural_share, limits.max_structural_share),
    ]
    return [c for c in checks if c is not None]


def accepted_quality(
    failures: list[GateFailure], fit: Fit, version: int, baseline: QualityBaseline | None,
    operator_accepted: bool = False,
) -> QualityBaseline | None:
    """The anchor a new bundle carries: its own figures for the first model and for one an
    operator accepted (``trainer once --accept``: the customer base really changed); otherwise
    the anchor it was judged against, unchanged, whether the gate passed it or it was forced
    past. So neither a publish within the budget nor a forced one moves the yardstick the gate
    and the consumers' drift measure against: ten steps each within the budget add up against
    one fixed anchor.

    >>> from trainer.fit import Fit
    >>> fit = Fit(np.zeros((2, 1)), np.array([0, 1]), 2, 1.0, 0.29, 1.24)
    >>> accepted_quality([], fit, 2, None)
    QualityBaseline(silhouette=0.29, davies_bouldin=1.24, version=2)
    >>> accepted_quality([], fit, 2, QualityBaseline(0.77, 0.34, 1))
    QualityBaseline(silhouette=0.77, davies_bouldin=0.34, version=1)
    >>> accepted_quality([GateFailure("silhouette_drop", 0.29, 0.67, "")], fit, 2,
    ...                  QualityBaseline(0.77, 0.34, 1))
    QualityBaseline(silhouette=0.77, davies_bouldin=0.34, version=1)
    >>> accepted_quality([GateFailure("silhouette_drop", 0.29, 0.67, "")], fit, 2,
    ...                  QualityBaseline(0.77, 0.34, 1), operator_accepted=True)
    QualityBaseline(silhouette=0.29, davies_bouldin=1.24, version=2)
    """
    if baseline is not None and not operator_accepted:
        return baseline
    return QualityBaseline(fit.silhouette, fit.davies_bouldin, version)


def gate_record(
    failures: list[GateFailure], current_silhouette: float | None, accepted: QualityBaseline | None,
    operator_accepted: bool = False,
) -> dict[str, float | str | bool]:
    """The bundle's ``quality.gate``: passed or not, each overridden check with its value (a
    forced publish), the current model's silhouette on the same window and the accepted
    baseline the bundle carries.

    >>> gate_record([GateFailure("silhouette_drop", 0.29, 0.67, "")], 0.3, QualityBaseline(0.77, 0.34, 1))
    ... # doctest: +NORMALIZE_WHITESPACE
    {'passed': False, 'current_silhouette': 0.3, 'silhouette_drop': 0.29,
     'overridden': 'silhouette_drop', 'baseline_silhouette': 0.77, 'baseline_davies_bouldin': 0.34,
     'baseline_version': 1}
    """
    record: dict[str, float | str | bool] = {
        "passed": not failures,
        "current_silhouette": current_silhouette if current_silhouette is not None else "none",
    }
    for failure in failures:
        record[failure.check] = failure.value
    if failures:
        record["overridden"] = ",".join(f.check for f in failures)
    if operator_accepted:
        record["operator_accepted"] = True
    if accepted is not None:
        record.update(accepted.record())
    return record
