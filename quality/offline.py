"""A trainer run without Kafka and Redis, and the consumer's drift signal without a consumer.

``retrain`` calls the trainer's own functions (the preprocessing of ``encode_window``,
``fit_model``, and ``trainer.refit``'s ``assess``, ``label`` and ``build_bundle``) in the order
``trainer.pipeline`` calls them, on a raw window of the demo's six features; versions and
segment ids come from in-memory counters. ``tracked_drift`` is the consumer's
``DriftTracker`` fed with the events a model scores.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from consumer.drift import DriftTracker
from consumer.model import ActiveModel
from segmentation.baseline import baseline_of, recorded_baseline
from segmentation.bundle import Lineage, ModelBundle
from segmentation.cluster_metrics import nearest_two
from segmentation.features import FeatureConfig, FeatureSpec, fit_numeric
from segmentation.settings import Settings
from trainer.__main__ import gate_limits, k_config
from trainer.fit import K_SELECTION, Fit, fit_model
from trainer.gate import GateFailure
from trainer.refit import Matching, Refit, assess, build_bundle, label, previous_rows


@dataclass
class Published:
    """What a run decided: the bundle (None if refused) and the gate's failures."""

    bundle: ModelBundle | None
    failures: list[GateFailure]
    fit: Fit
    refit: Refit | None = None

    @property
    def refused(self) -> bool:
        """Refused by the gate without --force (a forced run still records its failures)."""
        return bool(self.failures)


@dataclass
class IdSequences:
    """Stands in for Redis' counters: versions and segment ids, never reused."""

    versions: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(0))

    def fresh_ids(self, n: int) -> list[int]:
        return [next(self.ids) for _ in range(n)]


def fit_features(raw: np.ndarray, settings: Settings, current: ModelBundle | None) -> FeatureSpec:
    """The trainer's preprocessing (log by kind and by skewness, sticky for the features the
    current model logs; clipping; scaler) fitted on a raw window of ``settings.features``:
    ``trainer.pipeline.encode_window`` without the events."""
    config = FeatureConfig.of(settings)
    return fit_numeric(raw, config, current.features.log_features if current is not None else ())


def segment_ids(bundle: ModelBundle, raw: np.ndarray) -> np.ndarray:
    """The id the consumer gives each row under ``bundle``."""
    index, _, _ = nearest_two(bundle.features.encode_numeric(raw), bundle.centroid_array())
    return np.asarray(bundle.segment_ids)[index]


def retrain(raw: np.ndarray, current: ModelBundle | None, registry: IdSequences, settings: Settings,
            force: bool = False, accept: bool = False) -> Published:
    """One run of ``trainer.pipeline._train`` on the window ``raw`` (``trainer.refit``'s
    functions, in its order); ``accept``: the operator's ``--accept`` (implies ``force``)."""
    force = force or accept
    spec = fit_features(raw, settings, current)
    inside = ~spec.outside_envelope(raw)
    raw = raw[inside]
    x = spec.encode_numeric(raw)
    x_previous = current.features.encode_numeric(raw) if current is not None else None
    fit, fits = fit_model(x, k_config(settings), current.k if current is not None else None,
                          previous_rows(current, x_previous)[0])
    baseline = recorded_baseline(current) if current is not None else None
    if current is not None and baseline is None:
        baseline = baseline_of(current)
    refit = assess(
        spec, x, fit, fits, current, x_previous, baseline,
        gate_limits(settings), Matching(settings.match_threshold, settings.match_max_spread, {}),
        silhouette_sample=settings.silhouette_sample, random_state=settings.random_state,
        k_config=k_config(settings), force=force,
    )
    if refit.no_structure or (refit.failures and not force):
        return Published(None, refit.failures, refit.fit, refit)
    labelled = label(refit, current, registry.fresh_ids,
                     Matching(settings.match_threshold, settings.match_max_spread, {}))
    bundle = build_bundle(
        refit, next(registry.versions), labelled, current.version if current else None, baseline,
        Lineage(topic="offline"), "fixed" if settings.k is not None else K_SELECTION,
        operator_accepted=accept,
    )
    return Published(bundle, refit.failures, refit.fit, refit)


def failed_checks(runs: list[Published]) -> dict[str, int]:
    """How many runs each gate check refused.

    >>> failed_checks([])
    {}
    """
    counts: dict[str, int] = {}
    for run in runs:
        for f in run.failures:
            counts[f.check] = counts.get(f.check, 0) + 1
    return counts


def tracked_drift(bundle: ModelBundle, rows: np.ndarray) -> float:
    """The consumer's silhouette drift after scoring ``rows`` with ``bundle``: the sampled
    silhouette of recent events minus the accepted baseline the bundle carries."""
    model = ActiveModel.of(bundle)
    tracker = DriftTracker(model, window_events=rows.shape[0], sample=1000)
    x = bundle.features.encode_numeric(rows)
    index, d1, d2 = nearest_two(x, model.centroids)
    tracker.update(index, d1, d2, x)
    tracker.sampled_silhouette(force=True)
    drift = tracker.drift()
    if drift is None:
        raise RuntimeError("the tracker computed no silhouette")
    return drift
