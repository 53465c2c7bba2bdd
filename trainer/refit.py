"""A refit judged against the model in use, without I/O: the gate's inputs measured on the
window, the first model's fallback to another K, the ids, and the bundle.

``trainer.pipeline`` calls these around its reads and writes; ``quality.offline`` calls the same
functions on synthetic windows, so what ``make quality`` measures is what the trainer does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np

from segmentation.baseline import QualityBaseline
from segmentation.bundle import LabelMapping, Lineage, ModelBundle, Quality
from segmentation.cluster_metrics import (
    OUTLIER_RADIUS_FACTOR,
    feature_warnings,
    sampled_silhouette,
    segment_radii,
    silhouette_noise,
)
from segmentation.features import FeatureSpec
from trainer.fit import Fit, KConfig, continued, fit_model, recentred
from trainer.gate import GateFailure, GateLimits, accepted_quality, gate_record, run_gate
from trainer.segment_ids import centroids_in, label_segments, previous_assignment

# Rows in each of the samples the silhouette's sampling noise is measured on.
NOISE_SAMPLE = 2000


@dataclass(frozen=True)
class Matching:
    """How segment ids are matched (``SEG_MATCH_*``)."""

    threshold: float
    max_spread: float
    names: dict[int, str]


@dataclass(frozen=True)
class Refit:
    """A candidate model and everything the gate measured on it."""

    spec: FeatureSpec
    x: np.ndarray  # the rows it was fitted on (inside the training envelope), scaled
    fit: Fit
    fits: list[Fit]
    failures: list[GateFailure]
    on_window: float | None  # the current model's silhouette on the same rows
    noise: float  # the silhouette's sampling noise on these rows
    previous_labels: np.ndarray | None  # the current model's segment index of each row
    novel: np.ndarray | None  # rows beyond the current model's envelope
    fallback_from: int | None = None  # the K first chosen, when the gate refused it (see assess)
    continued: bool = False  # the current model's segments refitted (``trainer.fit.continued``)
    retiring: tuple[int, ...] = ()  # current segments the continuation dropped (``emptied``)
    refused: tuple[GateFailure, ...] = ()  # why the fit first chosen was refused (fallback_from)

    @property
    def no_structure(self) -> bool:
        """The window has no segment structure (K=1 chosen)."""
        return self.fit.k == 1


def previous_rows(current: ModelBundle | None,
                  x_previous: np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The current model's segment index of each row and which rows are novel to it; None
    when there is no current model or it could not encode the window."""
    if current is None or x_previous is None:
        return None, None
    return previous_assignment(current, x_previous)


def equal_k(fits: Sequence[Fit], k: int) -> Fit | None:
    """The refit at K = ``k``, if one was made.

    >>> z = np.zeros((1, 1)); l = np.zeros(1, dtype=int)
    >>> equal_k([Fit(z, l, 2, 1.0, 0.5, 0.5), Fit(z, l, 3, 1.0, 0.4, 0.6)], 3).silhouette
    0.4
    >>> equal_k([Fit(z, l, 2, 1.0, 0.5, 0.5)], 5) is None
    True
    """
    return next((f for f in fits if f.k == k), None)


def _gate(fit: Fit, fits: Sequence[Fit], x: np.ndarray, limits: GateLimits, current: ModelBundle | None,
          on_window: float | None, baseline: QualityBaseline | None, noise: float,
          structural_share: float | None, held: bool = False) -> list[GateFailure]:
    """``run_gate`` with the same-window comparison made at the current K: the refit at that K
    among ``fits`` against the current model, or a ``held`` candidate (the current structure,
    refitted) against it directly."""
    same_k = fit if held else equal_k(fits, current.k) if current is not None else None
    return run_gate(
        fit, x, limits, on_window if current is None or same_k is not None else None, baseline,
        equal_k_silhouette=None if same_k is None else same_k.silhouette, noise=noise,
        structural_share=structural_share,
    )


def structural_share(fit: Fit, spec: FeatureSpec, x: np.ndarray, current: ModelBundle | None,
                     previous_labels: np.ndarray | None, novel: np.ndarray | None,
                     matching: Matching, retiring: tuple[int, ...] = ()) -> float | None:
    """The share of customers the refit's splits, merges, births and retirements would move
    (None without a current model that scored the window)."""
    if current is None or previous_labels is None:
        return None
    _, _, mapping = label_segments(
        current, spec, fit.centroids, matching.threshold, lambda n: [-1 - i for i in range(n)], {},
        x=x, labels=fit.labels, max_spread=matching.max_spread,
        previous_labels=previous_labels, novel=novel, retiring=retiring,
    )
    return mapping.structural_share


def fallback_candidates(chosen: Fit, fits: Sequence[Fit]) -> list[Fit]:
    """The other fits, nearest K first (a first model that fails the gate at the chosen K is
    published at the nearest K that passes, flagged as such).

    >>> z = np.zeros((1, 1)); l = np.zeros(1, dtype=int)
    >>> fits = [Fit(z, l, k, 1.0, 0.5, 0.5) for k in (2, 3, 4, 5, 6)]
    >>> [f.k for f in fallback_candidates(fits[2], fits)]
    [3, 5, 2, 6]
    """
    others = [f for f in fits if f.k != chosen.k and f.k >= 2]
    return sorted(others, key=lambda f: (abs(f.k - chosen.k), f.k))


# A segment the current model now gives less than this fraction of its training share has
# emptied: most of its customers moved on (the at-risk who lapsed).
EMPTIED_FRACTION = 0.25


def emptied(
    previous_labels: np.ndarray | None, training_shares: Sequence[float], min_share: float
) -> np.ndarray:
    """Which current segments the current model's own assignment of the window gives less than
    ``min_share`` of it, or less than ``EMPTIED_FRACTION`` of their training share: their
    customers moved on (at-risk customers who all lapsed).

    >>> emptied(np.array([0] * 99 + [1] + [2] * 100), [0.3, 0.3, 0.4], 0.01).tolist()
    [False, True, False]
    >>> emptied(np.array([0] * 190 + [1] * 10), [0.5, 0.5], 0.01).tolist()  # 5% of 50%
    [False, True]
    >>> emptied(None, [0.5, 0.5], 0.01).tolist()
    [False, False]
    """
    k = len(training_shares)
    if previous_labels is None or previous_labels.shape[0] == 0:
        return np.zeros(k, dtype=bool)
    shares = np.bincount(previous_labels, minlength=k) / previous_labels.shape[0]
    return np.asarray((shares < min_share) | (shares < EMPTIED_FRACTION * np.asarray(training_shares)))


class Held(NamedTuple):
    """A candidate that keeps the current structure (see ``held_candidates``)."""

    fit: Fit
    continued: bool  # the current model's segments refitted (``trainer.fit.continued``)
    retiring: tuple[int, ...] = ()  # the current segments it dropped (``emptied``)


def held_candidates(fit: Fit, fits: Sequence[Fit], current: ModelBundle, spec: FeatureSpec,
                    x: np.ndarray, previous_labels: np.ndarray | None, min_share: float, *,
                    silhouette_sample: int, random_state: int, may_retire: bool = True) -> list[Held]:
    """What a retrain can publish when the gate refused the fit it chose: the refit at the
    current K (if another K was chosen), then the current model's segments refitted on the
    window (``trainer.fit.continued``), then, if ``may_retire`` (K is not pinned by the
    operator's SEG_K), the same without the segments that ``emptied`` (they retire, and only
    their few remaining customers move), and last the current segments ``recentred`` (moved to
    their customers' means, not redrawn: for a window where ``continued`` converges to another
    structure). All keep the current structure but for what the customers already left."""
    candidates = [Held(f, False) for f in fits if f.k == current.k and fit.k != current.k]
    start = centroids_in(spec, current)
    if start is None or start.shape[0] > x.shape[0]:
        return candidates
    candidates.append(Held(continued(x, start, random_state, silhouette_sample), True))
    gone = emptied(previous_labels, current.quality.shares, min_share)
    kept = start  # the segments recentred below
    dropped: tuple[int, ...] = ()  # and those retired
    if may_retire and gone.any() and (~gone).sum() >= 2:
        kept, dropped = start[~gone], tuple(int(i) for i in np.flatnonzero(gone))
        candidates.append(Held(continued(x, kept, random_state, silhouette_sample), True, dropped))
    candidates.append(Held(recentred(x, kept, random_state, silhouette_sample), True, dropped))
    return candidates


def assess(
    spec: FeatureSpec, x: np.ndarray, fit: Fit, fits: list[Fit], current: ModelBundle | None,
    x_previous: np.ndarray | None, baseline: QualityBaseline | None, limits: GateLimits,
    matching: Matching, *, silhouette_sample: int, random_state: int,
    k_config: KConfig | None = None, force: bool = False,
) -> Refit:
    """Measure and gate a refit (``x``: the rows it was fitted on; ``x_previous``: the same rows
    encoded by the current model's own spec, None if it cannot encode them).

    With no current model, a refit the gate refuses falls back to the nearest other K that
    passes (``fits``, or every K of ``k_config``'s range when K was fixed): a deployment starts with the best
    model that passes rather than with none.

    With a current model and no ``force``, a refit the gate refuses (a structural change, a
    merge that costs silhouette) falls back to the first of ``held_candidates`` that passes
    every check: the customers' drift is followed now, and the restructuring waits for an
    operator's ``--force`` or ``--accept`` (the bundle records the K that was chosen)."""
    previous_labels, novel = previous_rows(current, x_previous)
    on_window = None
    if previous_labels is not None:
        on_window = sampled_silhouette(x, previous_labels, silhouette_sample, random_state)

    def judged(candidate: Fit, held: Held | None = None) -> tuple[list[GateFailure], float]:
        noise = silhouette_noise(x, candidate.labels, min(NOISE_SAMPLE, silhouette_sample), random_state)
        moved = structural_share(candidate, spec, x, current, previous_labels, novel, matching,
                                 held.retiring if held is not None else ())
        return _gate(candidate, fits, x, limits, current, on_window, baseline, noise, moved,
                     held is not None), noise

    failures, noise = judged(fit)
    refit = Refit(spec, x, fit, fits, failures, on_window, noise, previous_labels, novel)
    if current is not None:
        operator_k = k_config is not None and k_config.k not in (None, current.k)
        if force or not failures or operator_k:
            return refit  # an operator's SEG_K is a change of K they asked for: refused, shown
        pinned = k_config is not None and k_config.k is not None
        for held in held_candidates(fit, fits, current, spec, x, previous_labels, limits.min_share,
                                    silhouette_sample=silhouette_sample, random_state=random_state,
                                    may_retire=not pinned):
            held_failures, held_noise = judged(held.fit, held)
            if not held_failures:
                return Refit(spec, x, held.fit, fits, [], on_window, held_noise, previous_labels,
                             novel, fallback_from=fit.k, continued=held.continued,
                             retiring=held.retiring, refused=tuple(failures))
        return refit
    if not failures or fit.k == 1:
        return refit
    candidates = fits if len(fits) > 1 or k_config is None else fit_model(x, replace(k_config, k=None))[1]
    for candidate in fallback_candidates(fit, candidates):
        candidate_failures, candidate_noise = judged(candidate)
        if not candidate_failures:
            return Refit(spec, x, candidate, list(candidates), [], on_window, candidate_noise,
                         previous_labels, novel, fallback_from=fit.k)
    return refit


def label(refit: Refit, current: ModelBundle | None, fresh_ids: Callable[[int], list[int]],
          matching: Matching) -> tuple[list[int], list[str], LabelMapping]:
    """Segment ids (fresh ones from ``fresh_ids``), names and the diff from the current model."""
    return label_segments(
        current, refit.spec, refit.fit.centroids, matching.threshold, fresh_ids, matching.names,
        x=refit.x, labels=refit.fit.labels, max_spread=matching.max_spread,
        previous_labels=refit.previous_labels, novel=refit.novel, retiring=refit.retiring,
    )


def build_bundle(
    refit: Refit, version: int, labelled: tuple[list[int], list[str], LabelMapping],
    previous_version: int | None, baseline: QualityBaseline | None, lineage: Lineage,
    k_selection: str, operator_accepted: bool = False,
) -> ModelBundle:
    """The bundle of a refit that is published (or stored as the challenger)."""
    ids, names, mapping = labelled
    fit = refit.fit
    accepted = accepted_quality(refit.failures, fit, version, baseline, operator_accepted)
    gate = gate_record(refit.failures, refit.on_window, accepted, operator_accepted)
    gate["silhouette_noise"] = refit.noise
    if refit.fallback_from is not None:
        gate["k_fallback_from"] = refit.fallback_from
    if refit.refused:
        gate["refused_checks"] = ",".join(f.check for f in refit.refused)
    if refit.continued:
        gate["continued_current_segments"] = True
    if refit.retiring:
        gate["retired_emptied"] = ",".join(
            str(c.segment_id) for c in mapping.retired if c.previous_index in refit.retiring)
    radii = segment_radii(refit.x, fit.labels, fit.centroids)
    return ModelBundle(
        version=version, features=refit.spec, centroids=fit.centroids.tolist(), segment_ids=ids,
        segment_names=names, previous_version=previous_version, label_mapping=mapping,
        quality=Quality(
            silhouette=fit.silhouette, davies_bouldin=fit.davies_bouldin, inertia=fit.inertia,
            shares=fit.shares.tolist(), sizes=fit.sizes, k_selection=k_selection,
            k_scores=[f.scores() for f in refit.fits], gate=gate,
            radius_p99=radii, radius_outlier=[OUTLIER_RADIUS_FACTOR * r for r in radii],
            feature_warnings=feature_warnings(refit.x[:, : refit.spec.n_numeric], refit.spec.numeric),
        ),
        lineage=lineage, forced=bool(refit.failures),
    )
