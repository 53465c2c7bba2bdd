"""The compacted models topic (``segment-models``): the record of truth of every published model
and of the registry around it. Redis is a cache of it that rebuilds itself from it.

Records (one partition, so their order is the publish order)::

    v<N>        the bundle of version N (JSON), written once; a tombstone if it lost the race
    current     {"version": N}: the version consumers must score with
    pinned      {"version": N} while a rollback holds scheduled retrains; {"version": null} after
    challenger  the challenger's bundle (JSON), scored by consumers in the shadow of the current
                model; a tombstone once it is promoted or discarded
    reserved    {"version": N, "next_segment_id": M}: the trainer's counters when the challenger
                slot last changed (a discarded challenger's version and ids leave no other trace
                once compaction has removed its record)

Everything else the registry needs is derived from these: the next version is one more than the
highest version ever published, held by the challenger or reserved, the next fresh segment id one
more than the highest id any of those carried (so versions and ids are never reused), and names
and retired ids are in the bundles' label mappings. A record read back is untrusted input
(``segmentation.readback``): one that is not one of these kinds (an odd key, a bundle that fails
validation, a pointer that is not a version) is skipped, counted and logged once, never used.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Protocol

from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition

from segmentation.bundle import BundleError, ModelBundle
from segmentation.kafka import KafkaClientSettings, ReadIncomplete, TopicReader, producer_config, read_to_end
from segmentation.readback import (
    MAX_KEY_CHARS,
    Readback,
    ReadbackError,
    ReadbackSettings,
    check_bundle_size,
    decode_pointer,
    decode_reserved,
    key_text,
    version_key,
)
from segmentation.store import ModelStore, TrainerState
from segmentation.store.models import Counters

log = logging.getLogger(__name__)


class ModelsTopicSettings(KafkaClientSettings, ReadbackSettings, Protocol):
    """What reading and writing the models topic reads (``Settings`` provides it)."""

    @property
    def models_topic(self) -> str: ...

MISSING = (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC, KafkaError._UNKNOWN_PARTITION)
CURRENT = "current"
PINNED = "pinned"
CHALLENGER = "challenger"
RESERVED = "reserved"


class ModelLogError(RuntimeError):
    """The models topic could not be written or read; nothing was switched."""


@dataclass
class Registry:
    """The registry as the models topic records it, read up to ``end_offset``."""

    bundles: dict[int, ModelBundle] = field(default_factory=dict)
    current: int | None = None
    pinned: int | None = None
    challenger: ModelBundle | None = None
    reserved: Counters = Counters(0, 0)
    end_offset: int = 0
    invalid_records: int = 0
    readback: Readback = field(default_factory=Readback, repr=False, compare=False)

    @property
    def newest_published(self) -> int:
        """The highest version published as a current model (0: none)."""
        return max(self.bundles, default=0)

    @property
    def max_version(self) -> int:
        """The highest version ever handed out: published, held by the challenger, or reserved.

        >>> Registry(reserved=Counters(version=4, next_segment_id=9)).max_version
        4
        """
        held = [] if self.challenger is None else [self.challenger.version]
        return max([self.newest_published, self.reserved.version, *held])

    @property
    def next_segment_id(self) -> int:
        """One more than every segment id any published bundle or the challenger carried, and
        at least the reserved counter.

        >>> Registry().next_segment_id
        0
        """
        carriers = [*self.bundles.values(), *([] if self.challenger is None else [self.challenger])]
        ids = [sid for b in carriers for sid in b.segment_ids]
        return max(max(ids, default=-1) + 1, self.reserved.next_segment_id)

    def current_bundle(self) -> ModelBundle | None:
        """The current version's bundle; the newest bundle if the pointer record is missing."""
        if self.current in self.bundles:
            return self.bundles[self.current]
        return self.bundles.get(self.newest_published)

    def apply(self, key: bytes | None, value: bytes | None, offset: int | None = None) -> None:
        """Fold one record of the topic into the registry. A record that is not one of its kinds
        changes nothing: it is counted in ``invalid_records`` and reported (``offset`` names it)."""
        try:
            self._fold(key_text(key, MAX_KEY_CHARS), value)
        except ReadbackError as exc:
            self.invalid_records += 1
            where = f"offset {offset}" if offset is not None else f"key {key!r:.60}"
            self.readback.rejected("models_topic", where, exc)

    def _fold(self, name: str, value: bytes | None) -> None:
        if name in (CURRENT, PINNED):
            version = None if value is None else decode_pointer(value)
            if name == PINNED:
                self.pinned = version
            elif version is not None:
                self.current = version
            return
        if name == RESERVED:
            if value is not None:
                version, next_id = decode_reserved(value)
                self.reserved = Counters(max(version, self.reserved.version),
                                         max(next_id, self.reserved.next_segment_id))
            return
        if name == CHALLENGER:  # a tombstone: promoted or discarded
            self.challenger = None if value is None else self.readback.bundle(value)
            return
        version = version_key(name)
        if value is None:  # a tombstone: a version that lost the publish race, never current
            self.bundles.pop(version, None)
            return
        bundle = self.readback.bundle(value)
        if bundle.version != version:
            raise ReadbackError("bad_key", f"bundle v{bundle.version} under the key {name!r}")
        self.bundles[version] = bundle


def end_offset(settings: ModelsTopicSettings, timeout_s: float = 10.0) -> int:
    """The models topic's high watermark: where the next record will go."""
    reader = TopicReader(settings, "models-probe")
    try:
        try:
            return reader.watermarks(TopicPartition(settings.models_topic, 0), timeout_s)[1]
        except KafkaException as exc:
            if exc.args[0].code() in MISSING:
                return 0  # nothing was ever published (the topic is created with the first run)
            raise
    finally:
        reader.close()


def read_registry(
    settings: ModelsTopicSettings, timeout_s: float = 60.0, readback: Readback | None = None,
) -> Registry:
    """Read the whole models topic (it is compacted: one record per key, plus what the cleaner
    has not reached yet) and fold it into a ``Registry``; ``readback`` counts and reports the
    records skipped."""
    registry = Registry(readback=readback or Readback.of(settings))
    reader = TopicReader(settings, "models-reader")
    try:
        registry.end_offset = reader.watermarks(TopicPartition(settings.models_topic, 0), timeout_s)[1]
        for msg in read_to_end(reader, settings.models_topic, [0], timeout_s):
            registry.apply(msg.key(), msg.value(), msg.offset())
    except ReadIncomplete as exc:
        raise ModelLogError(f"models topic read incomplete: {exc}") from None
    except KafkaException as exc:
        if exc.args[0].code() in MISSING:
            raise
        raise ModelLogError(f"models topic read: {exc.args[0].str()}") from None
    finally:
        reader.close()
    return registry


class ModelLog:
    """Appends to the models topic with an idempotent producer and ``acks=all``; ``append``
    returns only once the broker has every record, or raises ``ModelLogError``."""

    def __init__(self, settings: ModelsTopicSettings, timeout_s: float = 30.0) -> None:
        self.topic = settings.models_topic
        self.timeout_s = timeout_s
        self.max_bundle_bytes = settings.max_bundle_bytes
        self._producer = Producer(producer_config(settings))

    def _bundle_value(self, bundle: ModelBundle) -> bytes:
        """``bundle`` as its record's value; ``BundleError`` if it is larger than every reader
        accepts (``SEG_MAX_BUNDLE_BYTES``): nothing is written."""
        value = bundle.to_json().encode()
        try:
            check_bundle_size(len(value), self.max_bundle_bytes)
        except ReadbackError as exc:
            raise BundleError(f"v{bundle.version} not published: {exc.detail}; every reader would refuse "
                              "it (fewer segments or columns, or raise SEG_MAX_BUNDLE_BYTES)") from None
        return value

    def append(self, records: list[tuple[str, bytes | None]]) -> int:
        """Write ``records`` in order; returns the offset after the last one."""
        errors: list[str] = []
        last = -1

        def on_delivery(err: KafkaError | None, msg: object) -> None:
            nonlocal last
            if err is not None:
                errors.append(err.str())
            else:
                last = max(last, int(msg.offset()))  # type: ignore[attr-defined]

        for key, value in records:
            self._producer.produce(self.topic, key=key.encode(), value=value, on_delivery=on_delivery)
        pending = self._producer.flush(self.timeout_s)
        if pending or errors or last < 0:
            raise ModelLogError(f"models topic write failed: {pending} pending, errors {errors[:3]}")
        return last + 1

    def publish(self, bundle: ModelBundle) -> int:
        """The bundle, then the pointer to it."""
        return self.append([
            (f"v{bundle.version}", self._bundle_value(bundle)),
            pointer_record(CURRENT, bundle.version),
        ])

    def withdraw(self, version: int, current: int | None) -> int:
        """A version that lost the publish race is removed (a tombstone, which compaction turns
        into nothing) and the pointer set back to the version that won."""
        records: list[tuple[str, bytes | None]] = [(f"v{version}", None)]
        if current is not None:
            records.append(pointer_record(CURRENT, current))
        return self.append(records)

    def pin(self, version: int | None) -> int:
        return self.append([pointer_record(PINNED, version)])

    def set_challenger(self, bundle: ModelBundle, reserved: Counters) -> int:
        """``bundle`` in the challenger slot (replacing any), with the counters as they stand."""
        return self._challenger(self._bundle_value(bundle), reserved)

    def clear_challenger(self, reserved: Counters) -> int:
        """The challenger slot emptied (a tombstone), with the counters as they stand: what the
        challenger held is never handed out again, even once compaction has removed it."""
        return self._challenger(None, reserved)

    def _challenger(self, value: bytes | None, reserved: Counters) -> int:
        return self.append([(CHALLENGER, value), reserved_record(reserved)])


def pointer_record(key: str, version: int | None) -> tuple[str, bytes]:
    """A ``current`` or ``pinned`` record (``segmentation.contracts``: ``CurrentRecord``,
    ``PinnedRecord``); ``None`` only for ``pinned``, which unpins.

    >>> pointer_record(CURRENT, 3), pointer_record(PINNED, None)
    (('current', b'{"version": 3}'), ('pinned', b'{"version": null}'))
    """
    return key, json.dumps({"version": version}).encode()


def reserved_record(counters: Counters) -> tuple[str, bytes]:
    """The ``reserved`` record of ``counters`` (``segmentation.contracts.ReservedRecord``).

    >>> reserved_record(Counters(3, 10))
    ('reserved', b'{"version": 3, "next_segment_id": 10}')
    """
    value = {"version": counters.version, "next_segment_id": counters.next_segment_id}
    return RESERVED, json.dumps(value).encode()


def sync_store(settings: ModelsTopicSettings, store: ModelStore) -> bool:
    """Bring the Redis cache and the models topic into agreement; True if anything was written.

    * Redis behind the topic (emptied, restarted without its data, restored from an old
      snapshot): the cache is rebuilt from the topic.
    * The topic behind Redis (deleted and recreated, or written before this existed): every
      version Redis still holds is appended to it first, so that the record of truth is whole.

    * A pointer or counter in Redis that is not a number (garbage written there): rewritten from
      the topic.

    Cheap when both agree: one watermark request, one GET and one MGET."""
    end = end_offset(settings)
    if end > 0 and store.registry_offset() == end and store.pointers_readable():
        return False
    registry = read_registry(settings, readback=store.readback) if end > 0 else Registry()
    if backfill(settings, store, registry):
        registry = read_registry(settings, readback=store.readback)
    if not registry.bundles:
        return False
    current = registry.current if registry.current in registry.bundles else registry.newest_published
    moved = store.restore(
        list(registry.bundles.values()), registry.max_version, registry.next_segment_id,
        current, registry.pinned, registry.end_offset, challenger=registry.challenger,
    )
    challenger = None if registry.challenger is None else registry.challenger.version
    log.warning("model cache brought up to the models topic",
                extra={"versions": len(registry.bundles), "current": current, "challenger": challenger,
                       "pointer_moved": moved, "invalid_records": registry.invalid_records})
    return True


def backfill(settings: ModelsTopicSettings, store: ModelStore, registry: Registry) -> bool:
    """Append to the models topic the valid versions Redis holds and the topic lacks, then the
    pointer, the pin and the challenger; True if anything was appended."""
    records: list[tuple[str, bytes | None]] = []
    for version in store.versions():
        if version in registry.bundles:
            continue
        try:
            records.append((f"v{version}", store.load(version).to_json().encode()))
        except BundleError as exc:
            log.error("version not backfilled to the models topic", extra={"version": version,
                                                                            "error": str(exc)})
    if not records:
        return False
    current, counters = _held_pointers(store, registry)
    pinned = TrainerState.of(store).pinned()
    if current is not None and current > (registry.current or 0):
        records.append(pointer_record(CURRENT, current))
    if pinned is not None and registry.pinned is None:
        records.append(pointer_record(PINNED, pinned))
    challenger = _held_challenger(store) if registry.challenger is None else None
    if challenger is not None:
        records.append((CHALLENGER, challenger.to_json().encode()))
    records.append(reserved_record(counters))
    ModelLog(settings).append(records)
    log.warning("models topic backfilled from Redis", extra={"records": len(records)})
    return True


def _held_pointers(store: ModelStore, registry: Registry) -> tuple[int | None, Counters]:
    """Redis's current pointer and counters for a backfill; one that is not a number (reported
    by the store) is taken as absent, and counters as far as the topic's."""
    try:
        current: int | None = store.current_version()
    except BundleError:
        current = None
    try:
        counters = store.counters()
    except BundleError:
        counters = Counters(registry.max_version, registry.next_segment_id)
    return current, counters


def _held_challenger(store: ModelStore) -> ModelBundle | None:
    """The challenger Redis holds, or None (also when it is not a valid bundle: logged)."""
    try:
        return store.challenger()
    except BundleError as exc:
        log.error("challenger not backfilled to the models topic", extra={"error": str(exc)})
        return None
