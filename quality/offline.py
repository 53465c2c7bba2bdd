"""A trainer run without Kafka and Redis, and the consumer's drift signal without a consumer.

``retrain`` calls the trainer's own functions (the preprocessing of ``encode_window``,
``fit_model``, ``run_gate``, ``label_segments``, ``accepted_quality``, ``gate_record``) in the
order ``trainer.pipeline`` calls them, on a raw window of the demo's six features; versions and
segment ids come from in-memory counters. ``tracked_drift`` is the consumer's
``QualityTracker`` fed with the events a model scores.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from consumer.quality import QualityTracker
from consumer.watcher import ActiveModel
from demo.generator import FEATURES
from segmentation.baseline import baseline_of
from segmentation.bundle import Lineage, ModelBundle, Quality
from segmentation.cluster_metrics import nearest_two, sampled_silhouette
from segmentation.features import FeatureSpec, fit_numeric
from segmentation.settings import Settings
from trainer.fit import K_SELECTION, Fit, fit_model
from trainer.gate import GateFailure, GateLimits, accepted_quality, gate_record, run_gate
from trainer.labels import label_segments


@dataclass
class Published:
    """What a run decided: the bundle (None if refused) and the gate's failures."""

    bundle: ModelBundle | None
    failures: list[GateFailure]
    fit: Fit

    @property
    def refused(self) -> bool:
        """Refused by the gate without --force (a forced run still records its failures)."""
        return bool(self.failures)


@dataclass
class Registry:
    """Stands in for Redis' counters: versions and segment ids, never reused."""

    versions: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(0))

    def fresh_ids(self, n: int) -> list[int]:
        return [next(self.ids) for _ in range(n)]


def fit_features(raw: np.ndarray, settings: Settings, current: ModelBundle | None) -> FeatureSpec:
    """The trainer's preprocessing (log by skewness, sticky for the features the current model
    logs; clipping; scaler) fitted on a raw window of the demo's features:
    ``trainer.pipeline.encode_window`` without the events."""
    return fit_numeric(raw, FEATURES, settings.scaler, settings.log_features, settings.log_skewness,
                       (settings.clip_quantile, settings.clip_margin),
                       current.features.log_features if current is not None else ())


def segment_ids(bundle: ModelBundle, raw: np.ndarray) -> np.ndarray:
    """The id the consumer gives each row under ``bundle``."""
    index, _, _ = nearest_two(bundle.features.encode_numeric(raw), bundle.centroid_array())
    return np.asarray(bundle.segment_ids)[index]


def retrain(raw: np.ndarray, current: ModelBundle | None, registry: Registry, settings: Settings,
            force: bool = False) -> Published:
    """One run of ``trainer.pipeline._train`` on the window ``raw``."""
    spec = fit_features(raw, settings, current)
    x = spec.encode_numeric(raw)
    fit, fits = fit_model(x, settings.k, (settings.k_min, settings.k_max), settings.n_init,
                          settings.random_state, settings.silhouette_sample)
    baseline = baseline_of(current) if current is not None else None
    on_window = None
    if current is not None:  # the current model's partition of this window, in the new space
        labels, _, _ = nearest_two(current.features.encode_numeric(raw), current.centroid_array())
        on_window = sampled_silhouette(x, labels, settings.silhouette_sample, settings.random_state)
    failures = run_gate(fit, x, GateLimits.of(settings), on_window, baseline)
    if failures and not force:
        return Published(None, failures, fit)
    ids, names, mapping = label_segments(
        current, spec, fit.centroids, settings.match_threshold, registry.fresh_ids, {},
        x=x, labels=fit.labels, max_spread=settings.match_max_spread,
    )
    version = next(registry.versions)
    accepted = accepted_quality(failures, fit, version, baseline)
    bundle = ModelBundle(
        version=version, features=spec, centroids=fit.centroids.tolist(), segment_ids=ids,
        segment_names=names, previous_version=current.version if current else None,
        label_mapping=mapping,
        quality=Quality(silhouette=fit.silhouette, davies_bouldin=fit.davies_bouldin,
                        inertia=fit.inertia, shares=fit.shares.tolist(), sizes=fit.sizes,
                        k_selection="fixed" if settings.k is not None else K_SELECTION,
                        k_scores=[f.scores() for f in fits],
                        gate=gate_record(failures, on_window, accepted)),
        lineage=Lineage(topic="offline"), forced=bool(failures),
    )
    return Published(bundle, failures, fit)


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
    tracker = QualityTracker(model, window_events=rows.shape[0], sample=1000)
    x = bundle.features.encode_numeric(rows)
    index, d1, d2 = nearest_two(x, model.centroids)
    tracker.update(index, d1, d2, x)
    tracker.sampled_silhouette(force=True)
    drift = tracker.drift()
    if drift is None:
        raise RuntimeError("the tracker computed no silhouette")
    return drift
