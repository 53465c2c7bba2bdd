"""When to train: as soon as possible while there is no model, then every interval, and early
when the consumers report a sustained silhouette drop against the training baseline or a
sustained novelty share (events beyond their segment's training 99th percentile: a population
the model has no segment for), unless a challenger trained against the current model is already
being scored (it is the answer to that drift, waiting to be promoted or discarded); never while a
rollback pins the current model.

Reading Redis (``read_signals``) is kept apart from deciding (``Schedule.decide``), so that the
decision is tested without Redis (``tests/trainer/test_schedule.py``)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from segmentation.bundle import BundleError
from segmentation.store import OUTAGE, ModelStore, ReplicaStates, TrainerState
from segmentation.store.client import ErrorCounter

# While there is no model yet, try again this often (the window fills up quickly).
COLD_RETRY_S = 3.0


@dataclass(frozen=True)
class Signals:
    """What the schedule decides on, read from Redis in one go."""

    pinned: bool  # an operator rolled back: no retrain replaces it until `unpin`
    has_model: bool
    worst_drift: float  # the lowest silhouette drift a replica on the current model reports (0: none)
    challenger_pending: bool = False  # a challenger trained against the current model is in the slot
    novelty_share: float = 0.0  # the highest novelty share a replica on the current model reports


def read_signals(store: ModelStore, errors: ErrorCounter | None = None) -> Signals | None:
    """The schedule's inputs, or None while Redis is unreachable or the current pointer is not a
    version (reported by the store; the catch-up from the models topic rewrites it): nothing is
    due then."""
    try:
        pinned = TrainerState.of(store, errors).pinned() is not None
        current = store.current_version()
        states = ReplicaStates.of(store, errors).all()
        pending = challenger_pending(store, current)
    except (*OUTAGE, BundleError):
        return None
    return Signals(pinned=pinned, has_model=current is not None,
                   worst_drift=worst_drift(states, current), challenger_pending=pending,
                   novelty_share=highest_novelty(states, current))


def challenger_pending(store: ModelStore, current: int | None) -> bool:
    """True while the challenger slot holds a valid bundle trained against ``current``."""
    try:
        challenger = store.challenger()
    except BundleError:
        return False
    return challenger is not None and current is not None and challenger.previous_version == current


def worst_drift(states: list[dict[str, Any]], current: int | None) -> float:
    """The lowest silhouette drift reported by a replica on the ``current`` model (0: none).
    Replica states are untrusted: anything but a finite number is ignored.

    >>> worst_drift([{"model_version": 2, "silhouette_drift": -0.3},
    ...              {"model_version": 1, "silhouette_drift": -0.9},
    ...              {"model_version": 2, "silhouette_drift": float("nan")},
    ...              {"model_version": 2, "silhouette_drift": True},
    ...              {"model_version": 2, "silhouette_drift": "-5"}], current=2)
    -0.3
    """
    return min(reported(states, current, "silhouette_drift"), default=0.0)


def highest_novelty(states: list[dict[str, Any]], current: int | None) -> float:
    """The highest novelty share reported by a replica on the ``current`` model (0: none; a
    replica without a share yet, or on a model without radii, reports null).

    >>> highest_novelty([{"model_version": 2, "novelty_share": 0.012},
    ...                  {"model_version": 2, "novelty_share": 0.05},
    ...                  {"model_version": 1, "novelty_share": 0.4},
    ...                  {"model_version": 2, "novelty_share": None},
    ...                  {"model_version": 2, "novelty_share": float("inf")}], current=2)
    0.05
    """
    return max(reported(states, current, "novelty_share"), default=0.0)


def reported(states: list[dict[str, Any]], current: int | None, name: str) -> list[float]:
    """The finite numbers replicas on the ``current`` model report as ``name`` (replica states
    are untrusted: a bool, a string or a missing value is ignored)."""
    values = [s.get(name) for s in states if s.get("model_version") == current]
    return [float(v) for v in values
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)]


@dataclass(frozen=True)
class ScheduleConfig:
    """When runs are due: every ``train_interval_s``; early once the worst replica's silhouette
    drift stays below ``-drift_retrain_threshold``, or the novelty share above
    ``novelty_retrain_share`` (None: off), for ``drift_retrain_after_s``."""

    train_interval_s: float
    drift_retrain_after_s: float
    drift_retrain_threshold: float
    novelty_retrain_share: float | None


class Schedule:
    def __init__(self, config: ScheduleConfig, errors: ErrorCounter | None = None) -> None:
        self.config = config
        self.errors = errors  # Redis failures that do not stop the schedule, counted
        self.last_run = 0.0
        self.drift_since: float | None = None
        self.novelty_since: float | None = None

    def due(self, store: ModelStore, now: float | None = None) -> str | None:
        """Why a run is due now, or None."""
        signals = read_signals(store, self.errors)
        return None if signals is None else self.decide(signals, time.time() if now is None else now)

    def decide(self, signals: Signals, now: float) -> str | None:
        """Why a run is due at ``now`` given ``signals``, or None.

        >>> s = Schedule(ScheduleConfig(train_interval_s=600, drift_retrain_after_s=60,
        ...                             drift_retrain_threshold=0.1, novelty_retrain_share=0.03))
        >>> s.decide(Signals(pinned=False, has_model=False, worst_drift=0.0), now=100.0)
        'no model yet'
        >>> s.ran("published", now=100.0)
        >>> s.decide(Signals(pinned=False, has_model=True, worst_drift=0.0), now=200.0) is None
        True
        >>> s.decide(Signals(pinned=True, has_model=True, worst_drift=0.0), now=800.0) is None
        True
        >>> s.decide(Signals(pinned=False, has_model=True, worst_drift=0.0), now=800.0)
        'interval'
        >>> s.ran("challenger", now=800.0)
        >>> drifting = Signals(pinned=False, has_model=True, worst_drift=-0.5, challenger_pending=True)
        >>> [s.decide(drifting, now=t) for t in (900.0, 1000.0)]  # the challenger answers the drift
        [None, None]
        """
        if signals.pinned:
            return None
        drifting = self.drifting(signals.worst_drift, now)
        novel = self.novel(signals.novelty_share, now)
        if not signals.has_model:
            return "no model yet" if now - self.last_run >= COLD_RETRY_S else None
        if now - self.last_run >= self.config.train_interval_s:
            return "interval"
        if signals.challenger_pending or now - self.last_run < self.config.drift_retrain_after_s:
            return None
        if drifting:
            return "sustained silhouette drift"
        if novel:
            return "sustained novelty"
        return None

    def drifting(self, worst_drift: float, now: float) -> bool:
        """True once the worst replica's silhouette drift has stayed below -threshold for
        ``drift_retrain_after_s`` seconds."""
        if worst_drift > -self.config.drift_retrain_threshold:
            self.drift_since = None
            return False
        if self.drift_since is None:
            self.drift_since = now
        return now - self.drift_since >= self.config.drift_retrain_after_s

    def novel(self, share: float, now: float) -> bool:
        """True once the highest replica novelty share has stayed above
        ``novelty_retrain_share`` for ``drift_retrain_after_s`` seconds (never when it is off)."""
        limit = self.config.novelty_retrain_share
        if limit is None or share <= limit:
            self.novelty_since = None
            return False
        if self.novelty_since is None:
            self.novelty_since = now
        return now - self.novelty_since >= self.config.drift_retrain_after_s

    def ran(self, result: str, now: float | None = None) -> None:
        self.last_run = time.time() if now is None else now
        if result in ("published", "challenger"):
            self.drift_since = None
            self.novelty_since = None
