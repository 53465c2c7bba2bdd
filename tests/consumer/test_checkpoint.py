"""The commit protocol (``consumer.checkpoint``) without a broker: fake consumer, producer and
customer store that can fail, time out, be fenced and be revoked at every step, driving the real
``AtLeastOnce``/``ExactlyOnce`` deliveries and the real customer writer. Each test names one
ordering the chaos table exercises with real processes (docs/reliability.md)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from consumer.changes import Changes
from consumer.checkpoint import Batch, Checkpoint
from consumer.customer_writer import CustomerWriter
from consumer.delivery import AtLeastOnce, Delivery, DeliveryStopped, ExactlyOnce
from consumer.scoring import OutRecord, ScoredBatch
from segmentation.customer import CustomerAssignment
from segmentation.metrics import ConsumerMetrics
from tests.support.messages import SMALL_MODEL
from tests.support.stack import sample

TIMEOUT_S = 0.35  # the delivery timeout: two backoffs (0.1 s, 0.2 s), then the batch fails


@dataclass(frozen=True)
class Message:
    _topic: str
    _partition: int
    _offset: int

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes:
        return f"c-{self._partition}-{self._offset}".encode()

    def value(self) -> bytes:
        return b"{}"

    def headers(self) -> None:
        return None


@dataclass
class World:
    """What happened, in order, across the fakes: ("produce", key), ("ack", key), ("write", n),
    ("store", offsets), ("commit",), ("seek", (partition, offset)), ("txn", step)..."""

    log: list[tuple[str, Any]] = field(default_factory=list)

    def steps(self, kind: str) -> list[Any]:
        return [what for k, what in self.log if k == kind]

    def index(self, kind: str) -> int:
        return next(i for i, (k, _) in enumerate(self.log) if k == kind)

    def last(self, kind: str) -> int:
        return max(i for i, (k, _) in enumerate(self.log) if k == kind)


class FakeConsumer:
    def __init__(self, world: World) -> None:
        self.world = world

    def seek(self, tp: TopicPartition) -> None:
        self.world.log.append(("seek", (tp.partition, tp.offset)))

    def store_offsets(self, offsets: list[TopicPartition]) -> None:
        self.world.log.append(("store", sorted((tp.partition, tp.offset) for tp in offsets)))

    def commit(self, asynchronous: bool = True) -> None:
        self.world.log.append(("commit", None))

    def consumer_group_metadata(self) -> object:
        return object()


Failure = Callable[[bytes, int], "KafkaError | None"]  # (key, attempt) -> the delivery error, if any


class FakeProducer:
    """Delivery reports arrive on ``poll``/``flush`` (as librdkafka's do); ``fail`` decides each
    record's report; ``transaction_errors[call]`` are raised by the next calls of ``call``, one
    each, in order."""

    def __init__(self, world: World, fail: Failure | None = None) -> None:
        self.world = world
        self.fail = fail or (lambda key, attempt: None)
        self.queue: list[tuple[bytes, Callable[..., None]]] = []
        self.attempts: dict[bytes, int] = {}
        self.transaction_errors: dict[str, list[KafkaError]] = {}

    def produce(self, topic: str, key: bytes, value: bytes | None, headers: Any = None,
                on_delivery: Callable[..., None] | None = None, partition: int | None = None) -> None:
        self.world.log.append(("produce", key))
        self.attempts[key] = self.attempts.get(key, 0) + 1
        assert on_delivery is not None
        self.queue.append((key, on_delivery))

    def poll(self, timeout: float = 0) -> int:
        queued, self.queue = self.queue, []
        for key, on_delivery in queued:
            error = self.fail(key, self.attempts[key])
            if error is None:
                self.world.log.append(("ack", key))
            on_delivery(error, None)
        return len(queued)

    def flush(self, timeout: float = 0) -> int:
        self.poll()
        return 0

    def list_topics(self, topic: str, timeout: float = 0) -> Any:
        class Described:
            error = None
        class Metadata:
            topics = {topic: Described()}
        return Metadata()

    def _step(self, name: str) -> None:
        errors = self.transaction_errors.get(name)
        if errors:
            self.world.log.append(("txn", f"{name} failed"))
            raise KafkaException(errors.pop(0))
        self.world.log.append(("txn", name))

    def init_transactions(self, timeout: float = 0) -> None:
        self._step("init")

    def begin_transaction(self) -> None:
        self._step("begin")

    def send_offsets_to_transaction(self, offsets: list[TopicPartition], metadata: object,
                                    timeout: float = 0) -> None:
        self._step("send_offsets")
        self.world.log.append(("txn offsets", sorted((tp.partition, tp.offset) for tp in offsets)))

    def commit_transaction(self, timeout: float = 0) -> None:
        self.flush()
        self._step("commit")

    def abort_transaction(self, timeout: float = 0) -> None:
        self.queue = []  # aborted records are never acknowledged
        self._step("abort")


class FakeCustomers:
    """The customer store: records each write; ``error`` makes every write fail; ``gate`` holds
    writes until it is set."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.error: Exception | None = None
        self.gate = threading.Event()
        self.gate.set()

    def write_latest(self, assignments: Sequence[CustomerAssignment]) -> int:
        self.gate.wait(5)
        if self.error is not None:
            raise self.error
        self.world.log.append(("write", len(assignments)))
        return len(assignments)


@dataclass
class Rig:
    world: World
    consumer: FakeConsumer
    producer: FakeProducer
    customers: FakeCustomers
    metrics: ConsumerMetrics
    checkpoint: Checkpoint
    done: list[Batch]
    failed: list[list[int]]


def rig(exactly_once: bool = False, fail: Failure | None = None,
        transaction_errors: dict[str, list[KafkaError]] | None = None) -> Rig:
    world = World()
    consumer, producer, customers = FakeConsumer(world), FakeProducer(world, fail), FakeCustomers(world)
    producer.transaction_errors = transaction_errors or {}
    metrics = ConsumerMetrics()
    delivery: Delivery = (ExactlyOnce(producer, consumer, TIMEOUT_S) if exactly_once  # type: ignore[arg-type]
                          else AtLeastOnce(producer, consumer, TIMEOUT_S))  # type: ignore[arg-type]
    done: list[Batch] = []
    failed: list[list[int]] = []

    def substitute(record: OutRecord, error: KafkaError) -> OutRecord | None:
        return OutRecord("dlq", record.key, None, [("dlq.reason", b"output_rejected")], record.source)

    checkpoint = Checkpoint(
        consumer, delivery, CustomerWriter(customers, metrics), substitute,  # type: ignore[arg-type]
        on_done=done.append, on_failed=lambda ms: failed.append([m.offset() or 0 for m in ms]),
        failures=metrics.delivery_failures, exactly_once=exactly_once,
    )
    return Rig(world, consumer, producer, customers, metrics, checkpoint, done, failed)


def batch(offsets: Sequence[int], partition: int = 0, changes: bool = False) -> Batch:
    """A scored batch of one output and one customer per message (and one change each)."""
    messages = [Message("in", partition, o) for o in offsets]
    outputs = tuple(OutRecord("out", m.key(), b"{}", [], m) for m in messages)
    customers = tuple(CustomerAssignment(m.key().decode(), 1000, m.offset(), 1, "s", 1, "") for m in messages)
    found = Changes(tuple(OutRecord("changes", m.key(), b"{}", [], m, partition) for m in messages),
                    tuple("initial" for _ in messages)) if changes else Changes()
    return Batch(messages, SMALL_MODEL, ScoredBatch(outputs=outputs, customers=customers), found)


def polled(offsets: Sequence[int], partition: int = 0) -> list[Message]:
    return [Message("in", partition, o) for o in offsets]


def failing(*keys: bytes, error: int = KafkaError._MSG_TIMED_OUT, attempts: int = 1_000) -> Failure:
    """Reports ``error`` for ``keys`` on their first ``attempts`` attempts."""
    return lambda key, attempt: KafkaError(error) if key in keys and attempt <= attempts else None


# --- at-least-once ------------------------------------------------------------------------------
def test_offsets_are_stored_only_once_every_record_is_acknowledged_and_the_customers_are_written() -> None:
    r = rig()
    r.customers.gate.clear()  # the Redis write is slow
    assert r.checkpoint.add(batch([5, 6, 7], changes=True))
    assert r.world.steps("store") == [] and r.done == []  # added: nothing stored, nothing done
    releaser = threading.Timer(0.2, r.customers.gate.set)
    releaser.start()
    assert r.checkpoint.commit()
    stored = r.world.index("store")
    assert r.world.steps("store") == [[(0, 8)]]  # the offset after the batch's last message
    assert r.world.last("ack") < stored and r.world.index("write") < stored
    assert len(r.world.steps("ack")) == 6  # three outputs and three changes
    assert [b.messages[0].offset() for b in r.done] == [5]


def test_a_batch_is_added_only_once_the_one_before_is_committed() -> None:
    r = rig()
    r.checkpoint.add(batch([0]))
    with pytest.raises(RuntimeError, match="not committed"):
        r.checkpoint.add(batch([1]))


def test_a_delivery_that_keeps_failing_rewinds_the_batch_with_what_was_polled_after_it() -> None:
    r = rig(fail=failing(b"c-0-11"))
    assert r.checkpoint.add(batch([10, 11, 12]))
    assert not r.checkpoint.commit([*polled([13, 14]), *polled([40], partition=1)])
    assert r.world.steps("store") == [] and r.done == []
    # per partition, one seek to the first offset of the failed batch or of what came after it
    assert sorted(r.world.steps("seek")) == [(0, 10), (1, 40)]
    assert r.failed == [[10, 11, 12]]  # the loop drops what it derived from the batch
    assert sample(r.metrics, "segment_delivery_failures_total") == 1


def test_a_replay_sends_only_what_was_not_acknowledged_before_the_failure() -> None:
    r = rig(fail=failing(b"c-0-11", attempts=3))
    r.checkpoint.add(batch([10, 11, 12]))
    assert not r.checkpoint.commit()
    produced = len(r.world.steps("produce"))
    assert r.checkpoint.add(batch([10, 11, 12]))  # the replay
    assert r.world.steps("produce")[produced:] == [b"c-0-11"]
    assert r.checkpoint.commit()
    assert r.world.steps("store") == [[(0, 13)]] and r.checkpoint.acknowledged == set()


def test_a_record_refused_for_good_is_dead_lettered_and_the_batch_commits() -> None:
    r = rig(fail=failing(b"c-0-1", error=KafkaError.MSG_SIZE_TOO_LARGE, attempts=1))
    r.checkpoint.add(batch([0, 1, 2]))
    assert r.checkpoint.commit()
    assert r.world.steps("produce").count(b"c-0-1") == 2  # the output, then its dead letter
    assert r.world.steps("store") == [[(0, 3)]]


def test_a_topic_the_client_may_not_write_stops_the_consumer_with_nothing_stored() -> None:
    r = rig(fail=failing(b"c-0-0", error=KafkaError.TOPIC_AUTHORIZATION_FAILED))
    r.checkpoint.add(batch([0, 1]))
    with pytest.raises(DeliveryStopped):
        r.checkpoint.commit()
    assert r.world.steps("store") == [] and r.done == []


def test_a_redis_failure_is_counted_and_never_fails_the_batch() -> None:
    r = rig()
    r.customers.error = redis.ConnectionError("Redis is gone")
    r.checkpoint.add(batch([0, 1, 2]))
    assert r.checkpoint.commit()
    assert r.world.steps("store") == [[(0, 3)]] and len(r.done) == 1
    assert sample(r.metrics, "segment_customer_writes_skipped_total") == 3
    assert sample(r.metrics, "segment_redis_errors_total", operation="customer_write") == 1


def test_a_revoke_mid_batch_commits_it_then_commits_the_stored_offsets() -> None:
    r = rig()
    r.checkpoint.add(batch([4, 5]))
    r.checkpoint.revoke()
    assert [k for k, _ in r.world.log if k in ("store", "commit")] == ["store", "commit"]
    assert len(r.done) == 1


def test_a_batch_failing_during_a_revoke_is_rewound_at_the_next_begin_with_what_came_after() -> None:
    r = rig(fail=failing(b"c-1-20"))
    r.checkpoint.add(batch([20, 21], partition=1))
    r.checkpoint.revoke()
    assert r.world.steps("seek") == []  # no seek inside the rebalance callback
    assert r.world.steps("commit") == [None] and r.world.steps("store") == []  # what was stored before
    assert r.checkpoint.begin(polled([22], partition=1)) == []
    assert r.world.steps("seek") == [(1, 20)]
    assert r.checkpoint.begin(polled([20], partition=1)) == polled([20], partition=1)  # replayed once


def test_a_partition_that_leaves_forgets_what_its_failed_batch_had_acknowledged() -> None:
    r = rig(fail=failing(b"c-2-1", attempts=3))
    r.checkpoint.add(batch([0, 1], partition=2))
    assert not r.checkpoint.commit()
    assert ("in", 2, 0) in r.checkpoint.acknowledged
    r.checkpoint.forget([TopicPartition("in", 2)])
    assert r.checkpoint.acknowledged == set()  # the next owner replays it whole


def test_close_commits_the_batch_in_flight_and_the_stored_offsets_and_never_raises() -> None:
    r = rig()
    r.checkpoint.add(batch([0]))
    r.checkpoint.close(1.0)
    assert [k for k, _ in r.world.log if k in ("store", "commit")] == ["store", "commit"]

    stuck = rig(fail=failing(b"c-0-0"))
    stuck.checkpoint.add(batch([0]))
    stuck.checkpoint.close(1.0)  # the failure is logged; nothing stored, the next owner replays
    assert stuck.world.steps("store") == []


# --- exactly-once -------------------------------------------------------------------------------
def test_exactly_once_the_offsets_travel_in_the_committed_transaction_and_nothing_is_stored() -> None:
    r = rig(exactly_once=True)
    assert r.checkpoint.add(batch([7, 8], changes=True))
    steps = r.world.steps("txn")
    assert steps == ["init", "begin", "send_offsets", "commit"]
    assert r.world.steps("txn offsets") == [[(0, 9)]]
    assert len(r.world.steps("ack")) == 4 and r.world.last("ack") < r.world.log.index(("txn", "commit"))
    assert r.checkpoint.commit() and r.world.steps("store") == [] and len(r.done) == 1


def test_exactly_once_a_commit_that_keeps_timing_out_aborts_and_rewinds_the_batch() -> None:
    r = rig(exactly_once=True, transaction_errors={"commit": [KafkaError(KafkaError._TIMED_OUT)] * 1000})
    assert not r.checkpoint.add(batch([3, 4]))
    assert "commit" not in r.world.steps("txn") and "abort" in r.world.steps("txn")
    assert r.world.steps("seek") == [(0, 3)] and r.failed == [[3, 4]]
    assert r.checkpoint.in_flight is None and r.done == []


def test_exactly_once_a_commit_that_times_out_once_is_resumed_and_commits() -> None:
    r = rig(exactly_once=True, transaction_errors={"commit": [KafkaError(KafkaError._TIMED_OUT)]})
    assert r.checkpoint.add(batch([1]))
    assert r.world.steps("txn") == ["init", "begin", "send_offsets", "commit failed", "commit"]
    assert r.checkpoint.commit() and len(r.done) == 1


def test_exactly_once_a_fenced_producer_stops_the_consumer_with_nothing_committed() -> None:
    fenced = KafkaError(KafkaError._FENCED, fatal=True)
    r = rig(exactly_once=True, transaction_errors={"commit": [fenced]})
    with pytest.raises(DeliveryStopped):
        r.checkpoint.add(batch([0, 1]))
    assert "commit" not in r.world.steps("txn") and r.done == []


def test_exactly_once_a_revoke_commits_nothing_more_than_the_transactions_did() -> None:
    r = rig(exactly_once=True)
    r.checkpoint.add(batch([0]))
    r.checkpoint.revoke()
    assert r.world.steps("commit") == [] and r.world.steps("store") == [] and len(r.done) == 1


def test_a_deleted_output_topic_stops_the_consumer_with_nothing_stored() -> None:
    """The chaos table's ``permanent-error``: the broker says the topic does not exist."""
    r = rig(fail=failing(b"c-0-1", error=KafkaError.UNKNOWN_TOPIC_OR_PART))
    r.checkpoint.add(batch([0, 1, 2]))
    with pytest.raises(DeliveryStopped, match="cannot write"):
        r.checkpoint.commit()
    assert r.world.steps("store") == [] and r.done == []
