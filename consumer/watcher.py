"""The model in use: loaded from Redis, validated, swapped between batches, never older.

Redis is off the hot path: the bundle is cached in memory and refreshed when the trainer's
pub/sub notification arrives or, as a fallback, when the periodic poll sees a new pointer.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis
from confluent_kafka import KafkaException
from redis.client import PubSub

from consumer.model import ActiveModel
from segmentation.baseline import baseline_of
from segmentation.bundle import BundleError, ModelBundle
from segmentation.metrics import ConsumerMetrics
from segmentation.model_log import ModelLogError, Registry
from segmentation.readback import Readback, Recent
from segmentation.store import OUTAGE, ModelStore
from segmentation.store.models import StoredBundle

log = logging.getLogger(__name__)

RECENT_MODELS = 8  # models kept in memory to tell why a customer's segment changed
REMEMBERED_VERSIONS = 256  # refused or unloadable versions remembered (the least recent forgotten)


@dataclass(frozen=True, slots=True)
class WatcherConfig:
    """What the watcher reads of the settings: what a model must be compatible with (the input
    contract's features and the attributes), and how often to poll."""

    features: tuple[str, ...]
    categorical: tuple[str, ...]
    poll_s: float


@dataclass(frozen=True)
class ModelsTopic:
    """The models topic, the record of truth, bound to its Kafka connection by the composition
    root: ``read`` folds it into a registry, ``sync`` brings the Redis cache into agreement."""

    read: Callable[[Readback | None], Registry]
    sync: Callable[[ModelStore], bool]


class ModelWatcher:
    """Keeps the newest valid model. Rejects (and counts) invalid, incompatible or older ones."""

    def __init__(self, config: WatcherConfig, store: ModelStore, metrics: ConsumerMetrics,
                 models_topic: ModelsTopic) -> None:
        self.config = config
        self.models_topic = models_topic
        self.store = store
        self.metrics = metrics
        self.active: ActiveModel | None = None
        self.challenger: ActiveModel | None = None  # scored in the shadow, never emitted
        self._recent: dict[int, ActiveModel] = {}  # models swapped in lately, by version
        # version -> when to try loading it again; refused versions (bounded: a forgotten one is
        # only loaded and refused once more)
        self._unloadable: Recent[int, float] = Recent(REMEMBERED_VERSIONS)
        self._rejected: Recent[int, None] = Recent(REMEMBERED_VERSIONS)
        # the challenger value last judged, with the version in use it was judged against
        self._challenger_seen: tuple[int, str | None] | None = None
        self._pointer_error: str | None = None  # why the current pointer was last unreadable
        self._pubsub: PubSub | None = None
        self._next_poll = 0.0
        self._next_restore = 0.0

    def refresh(self) -> bool:
        """Look for a newer version and for the challenger (notification or due poll); True if
        the model in use changed."""
        notified = self._notified()
        now = time.monotonic()
        if not (notified or now >= self._next_poll or self.active is None):
            return False
        self._next_poll = now + self.config.poll_s
        changed = self._refresh_current()
        self._refresh_challenger()
        return changed

    def _refresh_current(self) -> bool:
        try:
            version = self.store.current_version()
        except OUTAGE:
            self.metrics.redis_errors.labels("model_poll").inc()
            return self.active is None and self._from_models_topic()
        except BundleError as exc:  # the pointer is not a version: the model in use is kept
            self._reject_pointer(str(exc))
            return self.active is None and self._from_models_topic()
        self._pointer_error = None
        if version is None and self.active is None:
            return self._from_models_topic()
        if version is None or version in self._rejected:
            return False
        if self.active is not None and version <= self.active.version:
            if version < self.active.version:
                # Fencing: an older pointer (a stale replica of Redis, a manual SET) is ignored.
                self._reject(version, f"v{version} is older than v{self.active.version} in use")
            return False
        try:
            bundle = self.store.load(version)
        except OUTAGE:
            self.metrics.redis_errors.labels("model_load").inc()
            return False
        except BundleError as exc:
            self._reject(version, str(exc))
            return False
        return self._activate(bundle)

    def _refresh_challenger(self) -> None:
        """The challenger in Redis, if it challenges the model in use. A value judged before
        against the same model in use (the same fingerprint: loaded or refused) is not parsed
        again: a poll of an unchanged slot costs a ``STRLEN``, a ``GET`` and a hash."""
        if self.active is None:
            self._set_challenger(None)
            return
        try:
            stored = self.store.stored(self.store.keys.challenger)
        except OUTAGE:
            self.metrics.redis_errors.labels("model_poll").inc()
            return  # keep what is scored in the shadow until Redis answers again
        except BundleError as exc:  # a key of another type
            self._set_challenger(None, f"challenger rejected: {exc}")
            return
        seen = (self.active.version, None if stored is None else stored.fingerprint)
        if seen == self._challenger_seen:
            return
        self._challenger_seen = seen
        self._set_challenger(*self._judge_challenger(stored, self.active))

    def _judge_challenger(
        self, stored: StoredBundle | None, active: ActiveModel,
    ) -> tuple[ActiveModel | None, str]:
        """The challenger ``stored`` holds if it challenges ``active``: a valid bundle within the
        cap, trained against it (its base), newer and compatible; else None and why."""
        if stored is None:
            return None, ""
        try:
            bundle = self.store.decode(stored)
            bundle.check_compatible(self.config.features, self.config.categorical)
        except BundleError as exc:
            return None, f"challenger rejected: {exc}"
        if bundle.previous_version != active.version or bundle.version <= active.version:
            return None, (f"challenger v{bundle.version} was trained against v{bundle.previous_version}, "
                          f"not v{active.version} in use")
        if self.challenger is not None and self.challenger.version == bundle.version:
            return self.challenger, ""  # the same version (rewritten): its arrays are ready
        return ActiveModel.of(bundle), ""

    def _set_challenger(self, challenger: ActiveModel | None, reason: str = "") -> None:
        before = self.challenger.version if self.challenger else None
        after = challenger.version if challenger else None
        self.challenger = challenger
        if before == after:
            return
        self.metrics.challenger_version.set(after or 0)
        log.info("challenger changed", extra={"from_version": before, "to_version": after,
                                              "reason": reason or None})

    def model_of(self, version: int) -> ActiveModel | None:
        """A model this consumer swapped in lately, or any published version loaded from Redis
        (None when it cannot be: tried again a minute later)."""
        if version in self._recent:
            return self._recent[version]
        if time.monotonic() < (self._unloadable.get(version) or 0.0):
            return None
        try:
            model = ActiveModel.of(self.store.load(version))
        except (*OUTAGE, BundleError) as exc:
            self._unloadable[version] = time.monotonic() + 60.0
            log.warning("earlier model not loadable", extra={"version": version, "error": str(exc)})
            return None
        self._remember(model)
        return model

    def _remember(self, model: ActiveModel) -> None:
        self._recent[model.version] = model
        while len(self._recent) > RECENT_MODELS:
            del self._recent[min(self._recent)]

    def _from_models_topic(self) -> bool:
        """No model in Redis (emptied, restarted without data, unreachable, a pointer that is not a
        version) and none in use: take the current one from the models topic, the record of
        truth, instead of waiting for a retrain, and rebuild the Redis cache from it (best
        effort). At most once per poll."""
        now = time.monotonic()
        if now < self._next_restore:
            return False
        self._next_restore = now + self.config.poll_s
        try:
            registry = self.models_topic.read(self.store.readback)
        except (ModelLogError, KafkaException) as exc:
            log.warning("models topic unreadable; waiting for a model", extra={"error": str(exc)})
            return False
        bundle = registry.current_bundle()
        if bundle is None:
            return False
        try:
            self.models_topic.sync(self.store)
        except (ModelLogError, KafkaException, BundleError, redis.RedisError) as exc:
            log.warning("model cache not rebuilt from the models topic", extra={"error": str(exc)})
        return self._activate(bundle)

    def _activate(self, bundle: ModelBundle) -> bool:
        try:
            bundle.check_compatible(self.config.features, self.config.categorical)
        except BundleError as exc:
            self._reject(bundle.version, str(exc))
            return False
        previous = self.active.version if self.active else None
        self.active = ActiveModel.of(bundle)
        self._remember(self.active)
        if self.challenger is not None and self.challenger.version <= bundle.version:
            self._set_challenger(None, f"v{bundle.version} is in use")
        self.metrics.model_version.set(bundle.version)
        self.metrics.model_created_at = bundle.created_at.timestamp()
        self.metrics.silhouette_baseline.set(baseline_of(bundle).silhouette)
        log.info("model swapped", extra={"from_version": previous, "to_version": bundle.version,
                                         "k": bundle.k})
        return True

    def _reject_pointer(self, reason: str) -> None:
        """Count an unreadable current pointer at every poll; log it once per reason."""
        if reason == self._pointer_error:
            self.metrics.bundle_rejections.inc()
            return
        self._pointer_error = reason
        self._reject(-1, reason)

    def _reject(self, version: int, reason: str) -> None:
        if version >= 0:
            self._rejected[version] = None
        self.metrics.bundle_rejections.inc()
        log.error("bundle rejected; keeping the last good model",
                  extra={"version": version, "reason": reason,
                         "in_use": self.active.version if self.active else None})

    def _notified(self) -> bool:
        """Drain pub/sub notifications without blocking; reconnects lazily after an outage."""
        try:
            if self._pubsub is None:
                self._pubsub = self.store.client.pubsub(ignore_subscribe_messages=True)
                self._pubsub.subscribe(self.store.keys.models_channel)
            seen = False
            while (message := self._pubsub.get_message(timeout=0.0)) is not None:
                seen = seen or message.get("type") == "message"
            return seen
        except OUTAGE:
            self.metrics.redis_errors.labels("pubsub").inc()
            self.close()
            return False

    def close(self) -> None:
        if self._pubsub is not None:
            with contextlib.suppress(*OUTAGE):
                self._pubsub.close()
            self._pubsub = None
