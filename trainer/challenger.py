"""Challenger models: a candidate the consumers score in the shadow of the current model (the
champion) before it may go live.

* The slot: ``store_challenger`` and ``clear_challenger`` write the models topic first (the record
  of truth), then Redis, which tells the consumers on the models channel; every publish of a new
  current model clears a challenger trained against another one (``clear_stale_challenger``).
* The automatic promotion rule: ``tally`` sums what the replicas report about the challenger and
  ``promotion_verdict`` decides; both pure, so that the rule is tested without Redis.

Promoting publishes a new current model, so it lives with the other commands that do
(``trainer.operations``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, TypeGuard

import redis
from confluent_kafka import KafkaException

from segmentation.bundle import BundleError, ModelBundle
from segmentation.domain import ChallengerAction
from segmentation.metrics import TrainerMetrics
from segmentation.model_log import ModelLogError
from segmentation.store import ModelStore
from trainer.models_topic import ModelTopic

log = logging.getLogger(__name__)

# The challenger's silhouette may be this much below the champion's on the same events and still
# be promoted automatically (the simplified silhouette of a few thousand events is that noisy).
SILHOUETTE_TOLERANCE = 0.02


class ChallengerRefused(RuntimeError):
    """A challenger command that cannot be carried out, with the reason for the operator."""


def store_challenger(models: ModelTopic, store: ModelStore, bundle: ModelBundle,
                     metrics: TrainerMetrics | None = None) -> None:
    """``bundle`` in the challenger slot, replacing any: the models topic first, then Redis and
    the notice to the consumers."""
    end = models.log().set_challenger(bundle, store.counters())
    store.set_challenger(bundle)
    store.set_registry_offset(end)
    _count(metrics, "published")
    log.info("challenger published", extra={"version": bundle.version, "base": bundle.previous_version,
                                            "k": bundle.k, "silhouette": round(bundle.quality.silhouette, 4)})


def clear_challenger(models: ModelTopic, store: ModelStore, action: ChallengerAction,
                     metrics: TrainerMetrics | None = None) -> None:
    """Empty the challenger slot (``action`` says why): a tombstone on the models topic with the
    counters as they stand (its version and ids are never handed out again), then Redis and the
    notice to the consumers."""
    end = models.log().clear_challenger(store.counters())
    store.set_challenger(None)
    store.set_registry_offset(end)
    _count(metrics, action)


def clear_stale_challenger(models: ModelTopic, store: ModelStore, current: int,
                           metrics: TrainerMetrics | None = None) -> bool:
    """After ``current`` became the current model: clear a challenger trained against another
    model (it can no longer be promoted) or one that is not a valid bundle; True if cleared.

    Best effort: the publish has happened, so a failure here is logged and the challenger stays
    until the next publish or `trainer discard` (consumers ignore a challenger of another base)."""
    try:
        challenger = store.challenger()
        if challenger is not None and current in (challenger.version, challenger.previous_version):
            return False  # being promoted, or trained against the new current model
    except BundleError as exc:
        log.error("challenger slot invalid", extra={"error": str(exc)})
        challenger = None
    else:
        if challenger is None:
            return False
    try:
        clear_challenger(models, store, "stale", metrics)
    except (ModelLogError, KafkaException, redis.RedisError) as exc:
        log.warning("stale challenger not cleared", extra={"current": current, "error": str(exc)})
        return False
    log.warning("stale challenger cleared: another model became current",
                extra={"current": current, "challenger": None if challenger is None else challenger.version,
                       "base": None if challenger is None else challenger.previous_version})
    return True


def _count(metrics: TrainerMetrics | None, action: ChallengerAction) -> None:
    if metrics is not None:
        metrics.challenger.labels(action).inc()


# --- the automatic promotion rule ------------------------------------------------------------------
@dataclass(frozen=True)
class Tally:
    """What the replicas report about one challenger, summed: events both models scored, how many
    the challenger gave the champion's segment id, and both models' simplified silhouettes over
    those events (averaged weighted by events)."""

    version: int
    replicas: int = 0
    events: int = 0
    agreed: int = 0
    silhouette: float = 0.0
    champion_silhouette: float = 0.0

    @property
    def agreement(self) -> float:
        return self.agreed / self.events if self.events else 0.0


@dataclass(frozen=True)
class PromotionRule:
    """When `trainer run` promotes the challenger by itself (``promotion_verdict``): after
    ``promote_after`` events scored with it (0: never), with at least ``min_agreement``."""

    promote_after: int
    min_agreement: float


@dataclass(frozen=True)
class Verdict:
    promote: bool
    reason: str


def tally(states: list[dict[str, Any]], version: int) -> Tally:
    """Sum the reports of the replicas whose ``challenger`` field is about ``version``.

    Replica states are untrusted: a report whose counts are not non-negative integers (booleans
    are not), that agrees on more events than it counts, or whose silhouettes are not finite
    numbers in [-1, 1] is ignored as a whole.

    >>> good = {"version": 7, "events": 300, "agreed": 270, "silhouette": 0.5,
    ...         "champion_silhouette": 0.6}
    >>> t = tally([{"challenger": good},
    ...            {"challenger": {**good, "events": 100, "agreed": 100, "silhouette": 0.9}},
    ...            {"challenger": {**good, "version": 6}},            # another challenger
    ...            {"challenger": {**good, "events": True}},          # a boolean
    ...            {"challenger": {**good, "silhouette": float("nan")}},
    ...            {"challenger": {**good, "agreed": 301}},           # more than it scored
    ...            {"challenger": "7"}, {"model_version": 7}], version=7)
    >>> (t.replicas, t.events, t.agreed, round(t.silhouette, 3), round(t.champion_silhouette, 3))
    (2, 400, 370, 0.6, 0.6)
    """
    reports = [r for r in (_report(s.get("challenger"), version) for s in states) if r is not None]
    events = sum(r[0] for r in reports)
    if not events:
        return Tally(version, replicas=len(reports))
    return Tally(
        version, replicas=len(reports), events=events, agreed=sum(r[1] for r in reports),
        silhouette=sum(r[0] * r[2] for r in reports) / events,
        champion_silhouette=sum(r[0] * r[3] for r in reports) / events,
    )


def _report(raw: object, version: int) -> tuple[int, int, float, float] | None:
    """One replica's (events, agreed, silhouette, champion silhouette) about ``version``, or None."""
    if not isinstance(raw, dict) or not _is_count(raw.get("version")) or raw["version"] != version:
        return None
    events, agreed = raw.get("events"), raw.get("agreed")
    silhouette, champion = raw.get("silhouette"), raw.get("champion_silhouette")
    if not (_is_count(events) and _is_count(agreed) and agreed <= events):
        return None
    if not (_is_silhouette(silhouette) and _is_silhouette(champion)):
        return None
    return events, agreed, float(silhouette), float(champion)


def _is_count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_silhouette(value: object) -> TypeGuard[float]:
    return (isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            and -1.0 <= value <= 1.0)


def promotion_verdict(seen: Tally, promote_after: int, min_agreement: float) -> Verdict:
    """Promote once the replicas scored at least ``promote_after`` events with the challenger
    (0: never automatically), it gave at least ``min_agreement`` of them the champion's segment
    id, and its silhouette is no more than ``SILHOUETTE_TOLERANCE`` below the champion's.

    >>> seen = Tally(7, replicas=2, events=5000, agreed=4700, silhouette=0.60, champion_silhouette=0.61)
    >>> promotion_verdict(seen, 4000, 0.9).promote
    True
    >>> promotion_verdict(seen, 0, 0.9).reason
    'automatic promotion is off'
    >>> promotion_verdict(seen, 6000, 0.9).reason
    'v7 scored 5000 of 6000 events'
    >>> promotion_verdict(seen, 4000, 0.95).reason
    'v7 agrees on 94.0% of 5000 events, below 95.0%'
    >>> promotion_verdict(Tally(7, 1, 5000, 5000, 0.5, 0.6), 4000, 0.9).reason
    'v7 silhouette 0.500 is below the champion 0.600 by more than 0.02'
    """
    v = f"v{seen.version}"
    if promote_after <= 0:
        return Verdict(False, "automatic promotion is off")
    if seen.events < promote_after:
        return Verdict(False, f"{v} scored {seen.events} of {promote_after} events")
    if seen.agreement < min_agreement:
        return Verdict(False, f"{v} agrees on {seen.agreement:.1%} of {seen.events} events, "
                              f"below {min_agreement:.1%}")
    if seen.silhouette < seen.champion_silhouette - SILHOUETTE_TOLERANCE:
        return Verdict(False, f"{v} silhouette {seen.silhouette:.3f} is below the champion "
                              f"{seen.champion_silhouette:.3f} by more than {SILHOUETTE_TOLERANCE}")
    return Verdict(True, f"{v} agrees on {seen.agreement:.1%} of {seen.events} events from "
                         f"{seen.replicas} replicas; silhouette {seen.silhouette:.3f} against the "
                         f"champion's {seen.champion_silhouette:.3f}")
