"""Kafka client configuration (built in one place) and the project's topics."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

log = logging.getLogger(__name__)
LIBRDKAFKA_LOG = logging.getLogger("librdkafka")

T = TypeVar("T")


class KafkaClientSettings(Protocol):
    """What building a Kafka client reads (``Settings`` provides it)."""

    @property
    def consumer_group(self) -> str: ...
    @property
    def commit_interval_ms(self) -> int: ...
    @property
    def max_record_bytes(self) -> int: ...
    def kafka_common(self) -> dict[str, str | int | float | bool]: ...


class TopicSettings(KafkaClientSettings, Protocol):
    """What creating, checking and deleting the project's topics reads (``Settings`` provides it)."""

    @property
    def events_topic(self) -> str: ...
    @property
    def events_partitions(self) -> int: ...
    @property
    def segments_topic(self) -> str: ...
    @property
    def dlq_topic(self) -> str: ...
    @property
    def models_topic(self) -> str: ...
    @property
    def changes_topic(self) -> str | None: ...

TRANSIENT_ERRORS = frozenset({
    KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._TIMED_OUT,
    KafkaError._MSG_TIMED_OUT, KafkaError.REQUEST_TIMED_OUT, KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.LEADER_NOT_AVAILABLE, KafkaError.NOT_ENOUGH_REPLICAS,
    KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND, KafkaError.NETWORK_EXCEPTION,
    KafkaError._WAIT_COORD, KafkaError.COORDINATOR_NOT_AVAILABLE, KafkaError.NOT_COORDINATOR,
    KafkaError.COORDINATOR_LOAD_IN_PROGRESS, KafkaError.KAFKA_STORAGE_ERROR,
    KafkaError.REPLICA_NOT_AVAILABLE, KafkaError._RESOLVE, KafkaError.OFFSET_NOT_AVAILABLE,
})


def is_transient(error: KafkaError) -> bool:
    """Errors that go away by themselves (leader moving, broker restarting, timeouts).

    >>> is_transient(KafkaError(KafkaError.NOT_LEADER_FOR_PARTITION))
    True
    >>> is_transient(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED))
    False
    """
    return not error.fatal() and (error.retriable() or error.code() in TRANSIENT_ERRORS)


class Backoff:
    """Exponential backoff bounded by a deadline."""

    def __init__(self, timeout_s: float, first_s: float = 0.1, max_s: float = 5.0) -> None:
        self.deadline = time.monotonic() + timeout_s
        self.delay_s = first_s
        self.max_s = max_s

    def wait(self) -> bool:
        """Sleep before the next attempt; ``False`` once the deadline has passed."""
        if time.monotonic() + self.delay_s > self.deadline:
            return False
        time.sleep(self.delay_s)
        self.delay_s = min(self.delay_s * 2, self.max_s)
        return True


def retrying(call: Callable[[], T], what: str, timeout_s: float = 60.0) -> T:
    """``call()``, retried with backoff while it raises a transient Kafka error."""
    backoff = Backoff(timeout_s)
    while True:
        try:
            return call()
        except KafkaException as exc:
            error: KafkaError = exc.args[0]
            if not is_transient(error) or not backoff.wait():
                raise
            log.warning("transient Kafka error; retrying", extra={"call": what, "error": error.str()})


class ReadIncomplete(RuntimeError):
    """A topic could not be read to its end within the time allowed."""


class TopicReader:
    """Reads partitions of a topic to their end by explicit assignment (``read_to_end``): the
    records with a ``reader_config`` consumer (``read_committed``: committed records only), the
    end offsets with a ``read_uncommitted`` one. Under ``read_committed`` a partition's end is its
    last stable offset, which stops at the first record of a transaction still open (a member
    killed mid-transaction holds it until the transaction is aborted or times out): records that
    other producers committed after it would be cut off, not waited for."""

    def __init__(self, settings: KafkaClientSettings, purpose: str) -> None:
        self.records = Consumer(reader_config(settings, purpose))
        self.ends = Consumer({**reader_config(settings, f"{purpose}-ends"),
                              "isolation.level": "read_uncommitted"})

    def watermarks(self, tp: TopicPartition, timeout_s: float) -> tuple[int, int]:
        """The first retained offset and the high watermark (open transactions included)."""
        return _watermarks(self.ends, tp, timeout_s)

    def close(self) -> None:
        for c in (self.records, self.ends):
            c.close()


@dataclass(slots=True)
class ReadPosition:
    """How far ``read_to_end`` got in one partition: the next offset to read and the high
    watermark it reads to (fixed when the read began)."""

    next: int
    end: int


def read_to_end(reader: TopicReader, topic: str, partitions: Iterable[int], timeout_s: float,
                positions: dict[int, ReadPosition] | None = None) -> Iterator[Message]:
    """Every committed record of ``partitions`` of ``topic``, from the first retained one to the
    high watermark at the call. A transaction still open below it holds the read (its records
    are skipped once it is aborted, yielded once committed) instead of ending it early:
    ``ReadIncomplete`` past ``timeout_s``, and the caller retries.

    With ``positions`` the read resumes: a partition found there starts at its ``next`` offset
    and reads to its ``end``; one not found is added. Each record's position is moved past it
    once the caller takes the next one (or the read ends), so that a read cut off by
    ``timeout_s`` goes on where it stopped at the next call instead of starting again."""
    deadline = time.monotonic() + timeout_s
    at = positions if positions is not None else {}
    for p in partitions:
        if p not in at:
            low, high = reader.watermarks(TopicPartition(topic, p), timeout_s)
            at[p] = ReadPosition(low, high)
    remaining = {p for p in partitions if at[p].next < at[p].end}
    if not remaining:
        return
    consumer = reader.records
    consumer.assign([TopicPartition(topic, p, at[p].next) for p in sorted(remaining)])
    try:
        fetched = False
        while remaining:
            if time.monotonic() > deadline and fetched:  # every call fetches once at least
                progress = ", ".join(f"{p}: {at[p].next}/{at[p].end}" for p in sorted(remaining))
                raise ReadIncomplete(f"{topic} not read to the end in {timeout_s:g}s (a long read, or "
                                     f"a transaction still open holds the end); at {progress}")
            fetched = True
            for msg in consumer.consume(num_messages=500, timeout=0.5):
                p, err = int(msg.partition() or 0), msg.error()
                if p not in remaining:
                    continue
                offset = int(msg.offset() or 0)
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        if offset >= at[p].end:
                            at[p].next = at[p].end
                            remaining.discard(p)  # else: at the last stable offset, waiting
                    elif not is_transient(err):
                        raise KafkaException(err)
                    continue
                if offset >= at[p].end:
                    at[p].next = at[p].end
                    remaining.discard(p)
                    continue
                yield msg
                at[p].next = offset + 1
                if at[p].next >= at[p].end:
                    remaining.discard(p)
    finally:
        consumer.unassign()


def _watermarks(consumer: Consumer, tp: TopicPartition, timeout_s: float) -> tuple[int, int]:
    low, high = retrying(lambda: consumer.get_watermark_offsets(tp, timeout=10, cached=False),
                         f"{tp.topic} watermarks", timeout_s)
    return int(low), int(high)


def client_common(settings: KafkaClientSettings) -> dict[str, Any]:
    """What every client gets: the shared options, and librdkafka's own log lines routed through
    the project's logger (so ``SEG_LOG_JSON=true`` output stays one JSON object per line)."""
    return {**settings.kafka_common(), "logger": LIBRDKAFKA_LOG}


def consumer_config(settings: KafkaClientSettings, exactly_once: bool) -> dict[str, Any]:
    """At-least-once: offsets are *stored* by the loop only after outputs are acknowledged and
    auto-committed on an interval. Exactly-once: offsets go through the producer transaction."""
    conf: dict[str, Any] = {
        "group.id": settings.consumer_group,
        "auto.offset.reset": "earliest",
        "enable.auto.offset.store": False,
        "enable.auto.commit": not exactly_once,
        "auto.commit.interval.ms": settings.commit_interval_ms,
        "partition.assignment.strategy": "cooperative-sticky",
        "isolation.level": "read_committed",
        "enable.partition.eof": False,
        "session.timeout.ms": 10000,
        "heartbeat.interval.ms": 1000,
    }
    conf.update(client_common(settings))
    return conf


def producer_config(settings: KafkaClientSettings, transactional_id: str | None = None,
                    reports: Literal["all", "errors"] = "all") -> dict[str, Any]:
    """``reports="errors"``: delivery reports (and their Python callbacks) only for the records
    that failed, for a producer that learns success from ``flush`` returning with nothing left
    (the consumer's: one callback and one message object per acknowledged record cost more
    than producing it)."""
    conf: dict[str, Any] = {
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "compression.type": "lz4",
        "message.max.bytes": settings.max_record_bytes,
        # every record gets its delivery report within this bound, well inside
        # max.poll.interval.ms: a retry never queues a second copy of a record still in flight
        "message.timeout.ms": 30_000,
    }
    if transactional_id is not None:
        conf["transactional.id"] = transactional_id
    if reports == "errors":
        conf["delivery.report.only.error"] = True
    conf.update(client_common(settings))
    return conf


def reader_config(settings: KafkaClientSettings, purpose: str) -> dict[str, Any]:
    """A consumer that only reads by explicit assignment and never commits (trainer window)."""
    conf: dict[str, Any] = {
        "group.id": f"{settings.consumer_group}-{purpose}",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "isolation.level": "read_committed",
        "auto.offset.reset": "earliest",
        "enable.partition.eof": True,
    }
    conf.update(client_common(settings))
    return conf


def topic_specs(settings: TopicSettings, changes_partitions: int | None = None) -> list[NewTopic]:
    """The topics this project owns, with explicit settings (the changes topic gets
    ``changes_partitions``, the input topic's count when it exists already)."""
    week = str(7 * 24 * 3600 * 1000)
    topics = [
        NewTopic(settings.events_topic, settings.events_partitions, 1,
                 config={"retention.ms": week}),
        NewTopic(settings.segments_topic, settings.events_partitions, 1,
                 config={"retention.ms": week}),
        NewTopic(settings.dlq_topic, 1, 1, config={"retention.ms": str(30 * 24 * 3600 * 1000)}),
        NewTopic(settings.models_topic, 1, 1,
                 config={"cleanup.policy": "compact", "min.compaction.lag.ms": "0"}),
    ]
    if settings.changes_topic is not None:
        # Co-partitioned with the input: a change goes to its event's partition number, and the
        # member owning that input partition rebuilds its customers' last segments from it.
        # Compaction keeps each customer's latest change, but not before a week: a subscriber
        # that falls behind by less than that still sees every change.
        topics.append(NewTopic(settings.changes_topic, changes_partitions or settings.events_partitions, 1,
                               config={"cleanup.policy": "compact", "min.compaction.lag.ms": week}))
    return topics


def project_topics(settings: TopicSettings) -> list[str]:
    """The names of the topics this project owns (``topic_specs``)."""
    return [t.topic for t in topic_specs(settings)]


class NotCoPartitioned(ValueError):
    """The changes topic does not have the input topic's partition count."""


def check_co_partitioned(settings: TopicSettings, timeout_s: float = 30.0) -> None:
    """``NotCoPartitioned`` unless the changes topic has exactly as many partitions as the input
    (each input partition's changes live in the partition of the same number)."""
    if settings.changes_topic is None:
        return
    admin = AdminClient(client_common(settings))
    listed = retrying(lambda: admin.list_topics(timeout=timeout_s), "list_topics", 60.0).topics
    counts = {t: len(listed[t].partitions) if t in listed else 0
              for t in (settings.events_topic, settings.changes_topic)}
    if counts[settings.events_topic] != counts[settings.changes_topic]:
        raise NotCoPartitioned(
            f"{settings.changes_topic} has {counts[settings.changes_topic]} partitions and "
            f"{settings.events_topic} {counts[settings.events_topic]}: they must be equal (recreate "
            f"{settings.changes_topic} with {counts[settings.events_topic]} partitions, or set "
            "SEG_CHANGES_TOPIC=null)"
        )


def ensure_topics(settings: TopicSettings, timeout_s: float = 30.0) -> list[str]:
    """Create missing topics; returns the names created. Existing topics are left as they are."""
    admin = AdminClient(client_common(settings))
    # a broker still starting (compose, a restart) answers with transient errors for a while
    existing = retrying(lambda: admin.list_topics(timeout=timeout_s), "list_topics", 60.0).topics
    events = existing.get(settings.events_topic)
    specs = topic_specs(settings, len(events.partitions) if events is not None else None)
    missing = [t for t in specs if t.topic not in existing]
    if not missing:
        return []
    created = []
    for name, future in admin.create_topics(missing, request_timeout=timeout_s).items():
        try:
            future.result(timeout=timeout_s)
            created.append(name)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
    _wait_for_leaders(admin, created, timeout_s)
    log.info("topics created", extra={"topics": created})
    return created


def _wait_for_leaders(admin: AdminClient, topics: list[str], timeout_s: float) -> None:
    """Topic creation returns before every partition has a leader; wait until it does."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        listed = admin.list_topics(timeout=timeout_s).topics
        if all(
            t in listed and listed[t].partitions
            and all(p.leader >= 0 for p in listed[t].partitions.values())
            for t in topics
        ):
            return
        time.sleep(0.1)
    raise TimeoutError(f"topics {topics} have no leader after {timeout_s}s")


def delete_topics(settings: TopicSettings, names: list[str], timeout_s: float = 30.0) -> None:
    admin = AdminClient(client_common(settings))
    for future in admin.delete_topics(names, request_timeout=timeout_s).values():
        try:
            future.result(timeout=timeout_s)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise
