"""When to train: as soon as possible while there is no model, then every interval, and early
when the consumers report a sustained silhouette drop against the training baseline; never
while a rollback pins the current model."""

from __future__ import annotations

import time

from segmentation.settings import Settings
from segmentation.store import OUTAGE, ModelStore, ReplicaStates, TrainerState
from segmentation.store.client import ErrorCounter

# While there is no model yet, try again this often (the window fills up quickly).
COLD_RETRY_S = 3.0


class Schedule:
    def __init__(self, settings: Settings, errors: ErrorCounter | None = None) -> None:
        self.settings = settings
        self.errors = errors  # Redis failures that do not stop the schedule, counted
        self.last_run = 0.0
        self.last_result = ""
        self.drift_since: float | None = None

    def due(self, store: ModelStore, now: float | None = None) -> str | None:
        """Why a run is due now, or None."""
        now = time.time() if now is None else now
        try:
            if TrainerState.of(store, self.errors).pinned() is not None:
                return None  # an operator rolled back: no retrain replaces it until `unpin`
            has_model = store.current_version() is not None
            drift = self.drifting(store, now)
        except OUTAGE:
            return None
        if not has_model:
            return "no model yet" if now - self.last_run >= COLD_RETRY_S else None
        if now - self.last_run >= self.settings.train_interval_s:
            return "interval"
        if drift and now - self.last_run >= self.settings.drift_retrain_after_s:
            return "sustained silhouette drift"
        return None

    def drifting(self, store: ModelStore, now: float) -> bool:
        """True once some replica's silhouette drift has stayed below -threshold for
        ``drift_retrain_after_s`` seconds."""
        current = store.current_version()
        drifts = [s.get("silhouette_drift") for s in ReplicaStates.of(store, self.errors).all()
                  if s.get("model_version") == current]
        worst = min((float(d) for d in drifts if isinstance(d, int | float)), default=0.0)
        if worst > -self.settings.drift_retrain_threshold:
            self.drift_since = None
            return False
        if self.drift_since is None:
            self.drift_since = now
        return now - self.drift_since >= self.settings.drift_retrain_after_s

    def ran(self, result: str, now: float | None = None) -> None:
        self.last_run = time.time() if now is None else now
        self.last_result = result
        if result == "published":
            self.drift_since = None
