"""A challenger model scored in the shadow: every event the champion scores is also assigned by
the challenger (``shadow_score``), never emitted; what the two would do differently is counted
(``Shadow.count``): the agreement rate and the migration matrix (champion segment -> challenger
segment, by stable segment id), and both models' simplified silhouettes over the same events,
which this replica reports to the trainer for the automatic promotion rule.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from consumer.model import ActiveModel
from consumer.scoring import ScoredBatch
from segmentation.cluster_metrics import nearest_two, simplified_silhouette
from segmentation.metrics import ConsumerMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ShadowScores:
    """The challenger's assignment of a batch's scored events (row for row)."""

    challenger: int  # version
    champion: int  # the version that scored the batch
    indices: np.ndarray
    nearest: np.ndarray
    second: np.ndarray


def shadow_score(
    batch: ScoredBatch, challenger: ActiveModel | None, champion: ActiveModel,
) -> ShadowScores | None:
    """The challenger's nearest segment for every scored event of ``batch`` (its own encoding
    and scaling: a challenger may log, clip or scale differently)."""
    if challenger is None or not batch.events:
        return None
    try:
        x, _ = challenger.bundle.features.encode(batch.events)
        indices, d1, d2 = nearest_two(x, challenger.centroids)
    except Exception as exc:  # noqa: BLE001 - the shadow never holds up the champion's outputs
        log.warning("challenger could not score a batch", extra={"version": challenger.version,
                                                                 "error": f"{type(exc).__name__}: {exc}"})
        return None
    return ShadowScores(challenger.version, champion.version, indices, d1, d2)


class Shadow:
    """What the challenger in the shadow would change, since it appeared (reset with it)."""

    def __init__(self, metrics: ConsumerMetrics) -> None:
        self.metrics = metrics
        self.version: int | None = None
        self.events = 0
        self.agreed = 0
        self.silhouette_sum = 0.0
        self.champion_silhouette_sum = 0.0

    def follow(self, challenger: ActiveModel | None) -> None:
        """Start over when the challenger changes (or goes)."""
        version = challenger.version if challenger else None
        if version == self.version:
            return
        self.version, self.events, self.agreed = version, 0, 0
        self.silhouette_sum = self.champion_silhouette_sum = 0.0
        self.metrics.challenger_migrations.clear()
        self.metrics.challenger_agreement.set(0)

    def count(self, batch: ScoredBatch, scores: ShadowScores | None, champion: ActiveModel,
              challenger: ActiveModel | None) -> None:
        """Count a finished batch's shadow ``scores``, if they are the current challenger's
        against the champion that scored the batch."""
        self.follow(challenger)
        if (scores is None or challenger is None or scores.challenger != challenger.version
                or scores.champion != champion.version or scores.indices.shape[0] == 0):
            return
        mine = np.asarray(champion.bundle.segment_ids)[batch.indices]
        theirs = np.asarray(challenger.bundle.segment_ids)[scores.indices]
        pairs, counts = np.unique(np.stack([mine, theirs]), axis=1, return_counts=True)
        for (a, b), n in zip(pairs.T.tolist(), counts.tolist(), strict=True):
            self.metrics.challenger_migrations.labels(str(a), str(b)).inc(n)
        self.events += int(mine.shape[0])
        self.agreed += int(np.count_nonzero(mine == theirs))
        self.silhouette_sum += float(simplified_silhouette(scores.nearest, scores.second).sum())
        self.champion_silhouette_sum += float(simplified_silhouette(batch.nearest, batch.second).sum())
        self.metrics.challenger_agreement.set(self.agreed / self.events)

    def state(self) -> dict[str, Any] | None:
        """For this replica's state in Redis (the trainer's automatic promotion reads it)."""
        if self.version is None or self.events == 0:
            return None
        return {"version": self.version, "events": self.events, "agreed": self.agreed,
                "silhouette": self.silhouette_sum / self.events,
                "champion_silhouette": self.champion_silhouette_sum / self.events}
