"""The consume loop (``consumer.loop``) without a broker or Redis: a fake consumer over an
in-memory partitioned log (consume, seek, store and commit as librdkafka does them), the fake
producer and customer store of ``tests/consumer/test_checkpoint.py``, and a watcher that serves a fixed
model. What is asserted is what the chaos table counts with real processes: nothing lost, every
offset stored stands for acknowledged outputs, a failed batch replayed."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from confluent_kafka import TopicPartition

from consumer.changes import Changes, ChangesConfig, SegmentChanges
from consumer.customer_writer import CustomerWriter
from consumer.delivery import AtLeastOnce, ExactlyOnce
from consumer.learner import Learner
from consumer.loop import ConsumeLoop, LoopConfig
from consumer.model import ActiveModel
from consumer.scoring import Message, ScoredBatch
from consumer.telemetry import Reporter
from segmentation.kafka import TopicReader
from segmentation.metrics import ConsumerMetrics
from segmentation.readback import Readback
from segmentation.store import ModelStore
from tests.consumer.test_checkpoint import (
    TIMEOUT_S,
    FakeConsumer,
    FakeCustomers,
    FakeProducer,
    World,
    failing,
)
from tests.support.fake_redis import FakeRedis
from tests.support.messages import SMALL_MODEL, SMALL_RULES, event
from tests.support.stack import sample


@dataclass(frozen=True)
class Record:
    _partition: int
    _offset: int
    _value: bytes

    def topic(self) -> str:
        return "in"

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes:
        return json.loads(self._value)["customer_id"].encode()

    def value(self) -> bytes:
        return self._value

    def headers(self) -> None:
        return None

    def error(self) -> None:
        return None


class LogConsumer(FakeConsumer):
    """A consumer of an in-memory log: ``consume`` reads on from each partition's position,
    ``seek`` moves it back, ``pause`` stops a partition."""

    def __init__(self, world: World, log: dict[int, list[Record]]) -> None:
        super().__init__(world)
        self.log = log
        self.at = dict.fromkeys(log, 0)  # each partition's position
        self.paused: set[int] = set()

    def consume(self, num_messages: int = 1, timeout: float = 0) -> list[Record]:
        taken: list[Record] = []
        for p in sorted(self.log):
            if p in self.paused:
                continue
            while len(taken) < num_messages and self.at[p] < len(self.log[p]):
                taken.append(self.log[p][self.at[p]])
                self.at[p] += 1
        return taken

    def seek(self, tp: TopicPartition) -> None:
        super().seek(tp)
        self.at[tp.partition] = tp.offset

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition("in", p) for p in self.log]

    def pause(self, partitions: list[TopicPartition]) -> None:
        self.paused |= {tp.partition for tp in partitions}

    def resume(self, partitions: list[TopicPartition]) -> None:
        self.paused -= {tp.partition for tp in partitions}

    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        return []  # no lag reported

    def close(self) -> None:
        self.world.log.append(("close", None))


class FixedWatcher:
    """Serves ``model`` (None: no model yet); says it is new once, as the real watcher does."""

    def __init__(self, model: ActiveModel | None) -> None:
        self.active = model
        self.challenger: ActiveModel | None = None
        self.fresh = model is not None

    def refresh(self) -> bool:
        fresh, self.fresh = self.fresh, False
        return fresh

    def model_of(self, version: int) -> ActiveModel | None:
        return self.active if self.active and self.active.version == version else None

    def close(self) -> None:
        pass


class HeldChanges:
    """The changes stage while the changes topic cannot be read for the first ``held`` batches."""

    def __init__(self, held: int) -> None:
        self.held = held

    def record(self, messages: Sequence[Message], batch: ScoredBatch, model: ActiveModel) -> Changes | None:
        if self.held:
            self.held -= 1
            return None
        return Changes()

    def forget_messages(self, messages: Sequence[Message]) -> None:
        pass

    def close(self) -> None:
        pass


def no_reader() -> TopicReader:
    raise AssertionError("without a changes topic nothing is read")


def events_log(partitions: int = 2, per_partition: int = 30) -> dict[int, list[Record]]:
    return {p: [Record(p, o, event(customer_id=f"c-{p}-{o % 7}", event_id=f"e-{p}-{o}"))
                for o in range(per_partition)] for p in range(partitions)}


@dataclass
class Running:
    world: World
    consumer: LogConsumer
    producer: FakeProducer
    metrics: ConsumerMetrics
    loop: ConsumeLoop


def loop_on(log: dict[int, list[Record]], model: ActiveModel | None = SMALL_MODEL, exactly_once: bool = False,
            producer_fails: Any = None, changes: Any = None, batch_size: int = 8) -> Running:
    world = World()
    consumer = LogConsumer(world, log)
    producer = FakeProducer(world, producer_fails)
    delivery = (ExactlyOnce(producer, consumer, TIMEOUT_S) if exactly_once  # type: ignore[arg-type]
                else AtLeastOnce(producer, consumer, TIMEOUT_S))  # type: ignore[arg-type]
    metrics = ConsumerMetrics()
    store = ModelStore(FakeRedis(), "t")  # type: ignore[arg-type]
    loop = ConsumeLoop(
        LoopConfig("in", batch_size, 0.0, exactly_once, 1.0), consumer, delivery,  # type: ignore[arg-type]
        SMALL_RULES, FixedWatcher(model),  # type: ignore[arg-type]
        changes or SegmentChanges(ChangesConfig(None, 1.0, 200), no_reader, Readback(), metrics,
                                  lambda v: None),
        Learner(5000.0, 0, metrics), Reporter("r", consumer, store, metrics),  # type: ignore[arg-type]
        CustomerWriter(FakeCustomers(world), metrics), metrics,  # type: ignore[arg-type]
    )
    loop.membership.assigned = {("in", p) for p in log}
    return Running(world, consumer, producer, metrics, loop)


def run_until_idle(r: Running, steps: int = 200) -> None:
    """Steps until nothing is left to consume and nothing is in flight."""
    for _ in range(steps):
        r.loop.step()
        drained = all(r.consumer.at[p] == len(r.consumer.log[p]) for p in r.consumer.log)
        if drained and r.loop.checkpoint.in_flight is None:
            return
    raise AssertionError("the loop did not drain the log")


def acknowledged_outputs(r: Running) -> list[bytes]:
    """Keys of output records acknowledged (customer ids)."""
    return [key for kind, key in r.world.log if kind == "ack"]


def stored(r: Running) -> dict[int, int]:
    """The last offset stored per partition."""
    last: dict[int, int] = {}
    for offsets in r.world.steps("store"):
        for p, o in offsets:
            assert o >= last.get(p, 0), "offsets stored out of order"
            last[p] = o
    return last


def test_every_event_gets_one_acknowledged_output_and_every_offset_is_stored_in_order() -> None:
    r = loop_on(events_log())
    run_until_idle(r)
    assert len(acknowledged_outputs(r)) == 60
    assert stored(r) == {0: 30, 1: 30}
    assert sample(r.metrics, "segment_events_total", outcome="scored") == 60
    assert r.world.steps("seek") == []  # nothing replayed


def test_a_batch_whose_delivery_fails_is_replayed_and_nothing_is_lost() -> None:
    r = loop_on(events_log(), producer_fails=failing(b"c-0-3", attempts=4))  # longer than a timeout
    run_until_idle(r)
    assert sample(r.metrics, "segment_delivery_failures_total") >= 1
    assert r.world.steps("seek")  # rewound
    assert stored(r) == {0: 30, 1: 30}
    keys = acknowledged_outputs(r)
    assert {f"c-{p}-{o % 7}".encode() for p in (0, 1) for o in range(30)} <= set(keys)
    assert keys.count(b"c-0-3") >= 4  # each of c-0-3's four events, once it finally got through


def test_exactly_once_every_batch_commits_its_offsets_in_its_transaction() -> None:
    r = loop_on(events_log(), exactly_once=True)
    run_until_idle(r)
    last: dict[int, int] = {}
    for offsets in r.world.steps("txn offsets"):
        last.update(offsets)
    assert last == {0: 30, 1: 30}
    assert r.world.steps("store") == [] and len(acknowledged_outputs(r)) == 60


def test_without_a_model_the_partitions_are_paused_and_nothing_is_stored_or_sent() -> None:
    r = loop_on(events_log(), model=None)
    r.loop.step()
    assert r.consumer.paused == {0, 1} and not r.loop.ready
    assert r.world.steps("produce") == [] and r.world.steps("store") == []
    assert r.consumer.at == {0: 0, 1: 0}  # what was polled is put back


def test_a_batch_held_for_its_changes_is_consumed_again_and_nothing_is_skipped() -> None:
    r = loop_on(events_log(1, 8), changes=HeldChanges(held=1), batch_size=8)
    run_until_idle(r)
    assert r.world.steps("seek")[0] == (0, 0)
    assert stored(r) == {0: 8} and len(acknowledged_outputs(r)) == 8


def test_a_revoke_mid_batch_commits_the_batch_in_flight_then_forgets_the_partitions() -> None:
    r = loop_on(events_log())
    r.loop.step()
    assert r.loop.checkpoint.in_flight is not None
    revoked = [TopicPartition("in", 0), TopicPartition("in", 1)]
    r.loop.membership._on_revoke(r.consumer, revoked)  # type: ignore[arg-type]  # noqa: SLF001
    assert r.loop.checkpoint.in_flight is None and r.loop.membership.assigned == set()
    assert [k for k, _ in r.world.log if k in ("store", "commit")][-2:] == ["store", "commit"]


def test_the_online_model_learns_only_committed_batches() -> None:
    r = loop_on(events_log(1, 16), batch_size=8)
    r.loop.step()  # the first batch is in flight, not committed
    online = r.loop.learner.online
    assert online is not None and online.events_seen == 0
    run_until_idle(r)
    assert online.events_seen == 16 and np.isfinite(online.centroids).all()


def test_close_commits_what_is_in_flight_and_closes_the_consumer() -> None:
    r = loop_on(events_log())
    r.loop.step()
    r.loop.close()
    kinds = [k for k, _ in r.world.log if k in ("store", "commit", "close")]
    assert kinds[-3:] == ["store", "commit", "close"]


def test_a_consumer_killed_mid_batch_is_replayed_by_the_next_one_from_the_stored_offsets() -> None:
    """The chaos table's ``consumer-kill``: a member dies (no close, no commit) with a batch in
    flight; the next owner starts at the offsets stored, and every event gets its output."""
    log = events_log()
    first = loop_on(log)
    for _ in range(4):
        first.loop.step()
    assert first.loop.checkpoint.in_flight is not None  # killed here
    committed = stored(first)
    second = loop_on(log)
    second.consumer.at = {p: committed.get(p, 0) for p in log}
    run_until_idle(second)
    keys = acknowledged_outputs(first) + acknowledged_outputs(second)
    assert len(keys) >= 60 and stored(second) == {0: 30, 1: 30}
    expected = [m.key() for p in log for m in log[p]]
    assert all(keys.count(k) >= expected.count(k) for k in set(expected))  # nothing lost
