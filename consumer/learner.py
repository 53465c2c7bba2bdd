"""The online model's lifecycle: a fresh ``OnlineKMeans`` and ``DriftTracker`` for each model
the consumer swaps in (``Learner.reset``), then every finished batch learned (``Learner.learn``).

The online centres never score: they follow drift between retrains and are reported (centroid
drift, crossings, this replica's state) for the trainer and for operators.
"""

from __future__ import annotations

import logging

import numpy as np

from consumer.drift import DriftTracker
from consumer.model import ActiveModel
from consumer.online import OnlineKMeans
from consumer.scoring import ScoredBatch
from segmentation.metrics import ConsumerMetrics

log = logging.getLogger(__name__)


class Learner:
    """Owns the online model and the quality tracker of the model in use (none before the first)."""

    def __init__(self, half_life_events: float, random_state: int, metrics: ConsumerMetrics) -> None:
        self.half_life_events = half_life_events  # the online centres forget at this half-life
        self.random_state = random_state
        self.metrics = metrics
        self.online: OnlineKMeans | None = None
        self.quality: DriftTracker | None = None
        self.version: int | None = None  # the model the online centres started from

    def reset(self, model: ActiveModel) -> None:
        """Start over from ``model``'s centroids and training shares (the space changed)."""
        self.online = OnlineKMeans(
            model.centroids, np.asarray(model.bundle.quality.shares),
            self.half_life_events, self.random_state,
        )
        self.quality = DriftTracker(model)
        self.version = model.version
        if model.radius_p99 is None or model.radius_outlier is None:
            # Said once per model: every batch would repeat it.
            log.warning("the model carries no training radii: no novelty share, no outlier flag",
                        extra={"model_version": model.version})
        # Per-segment gauges of the previous model must not linger (a retired id would keep
        # its last share and drift for ever); the next report fills in the new model's ids.
        self.metrics.share.clear()
        self.metrics.centroid_drift.clear()
        self.metrics.novelty_share.set(float("nan"))  # unknown until the new model's window fills

    def learn(self, batch: ScoredBatch, scored_by: ActiveModel) -> None:
        """Move the online centres towards the batch's scored events and track its quality. A
        batch scored by another model than the one the centres started from (a new version was
        swapped in while it was in flight) is left out: its rows and segment indices belong to
        that model's space."""
        if self.online is None or self.quality is None or batch.indices.shape[0] == 0:
            return
        if scored_by.version != self.version:
            return
        outliers = self.online.learn(batch.encoded, batch.nearest, batch.outliers)
        if outliers:  # scored and delivered like any event; only the online centres ignore them
            log.debug("outliers left out of online learning", extra={"rows": outliers})
        self.quality.update(batch.indices, batch.nearest, batch.second, batch.encoded, batch.novel)
