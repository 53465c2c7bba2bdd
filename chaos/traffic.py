"""Traffic in and out: a producer of uniquely identified events (valid and hostile) that records
where each one landed, and a collector that reads the output and dead-letter topics back with
``read_committed``, as a subscriber would."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

from chaos import hostile
from demo.generator import Customer, another_profile, event_value, make_customers
from segmentation.kafka import producer_config
from segmentation.settings import Settings

SWITCH_EVERY = 10  # one customer in this many switches profile back and forth


@dataclass(frozen=True, slots=True)
class Sent:
    """One produced message: its kind (``valid`` or a hostile kind) and where it landed."""

    kind: str
    event_id: str
    partition: int
    offset: int
    at: float  # producer CreateTime, epoch seconds


class Traffic:
    """Produces events with unique event ids; delivery reports say where each one landed."""

    def __init__(self, settings: Settings, tag: str, customers: int = 2000, seed: int = 11) -> None:
        self.settings = settings
        self.tag = tag
        self.rng = np.random.default_rng(seed)
        self.customers: list[Customer] = make_customers(customers, self.rng, prefix=f"{tag}-c")
        self.producer = Producer(producer_config(settings))
        self.sent: list[Sent] = []
        self.failed: Counter[str] = Counter()
        self.lock = threading.Lock()
        self._seq = 0
        self._events_of: Counter[str] = Counter()
        self.stop = threading.Event()

    def _next_id(self, letter: str) -> str:
        self._seq += 1
        return f"{self.tag}-{letter}{self._seq}"

    def _report(self, kind: str, event_id: str) -> Callable[[KafkaError | None, Message], None]:
        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            with self.lock:
                if err is not None:
                    self.failed[f"{kind}: {err.name()}"] += 1
                    return
                _, ts = msg.timestamp()
                self.sent.append(Sent(kind, event_id, int(msg.partition() or 0), int(msg.offset() or 0),
                                      ts / 1000.0))
        return on_delivery

    def _produce(self, kind: str, event_id: str, key: bytes | None, value: bytes | None,
                 headers: list[tuple[str, str | bytes | None]]) -> None:
        while True:
            try:
                self.producer.produce(self.settings.events_topic, key=key, value=value,
                                      headers=headers or None, on_delivery=self._report(kind, event_id))
                return
            except BufferError:
                self.producer.poll(0.05)

    def valid(self, customer: Customer | None = None) -> None:
        customer = customer or self.customers[int(self.rng.integers(len(self.customers)))]
        event_id = self._next_id("v")
        value = json.dumps(event_value(customer, self.rng, event_id, shift=self._switch(customer))).encode()
        self._produce("valid", event_id, customer.customer_id.encode(), value, [])

    def _switch(self, customer: Customer) -> np.ndarray | None:
        """One customer in ten switches profile on every other event of theirs after the first,
        so that the changes topic carries a stream of true changes through every fault."""
        if int(customer.customer_id.rsplit("-", 1)[1]) % SWITCH_EVERY:
            return None
        self._events_of[customer.customer_id] += 1
        if self._events_of[customer.customer_id] % 2:
            return None
        return another_profile(customer) / customer.centre

    def hostile(self, kind: str) -> None:
        customer = self.customers[int(self.rng.integers(len(self.customers)))]
        event_id = self._next_id("h")
        key, value, headers = hostile.build(kind, event_value(customer, self.rng, event_id))
        self._produce(kind, event_id, key, value, list(headers))

    def one_per_customer(self) -> None:
        """The first batch: one valid event per customer (enough rows for the first model)."""
        for i, customer in enumerate(self.customers):
            self.valid(customer)
            if i % 500 == 0:
                self.producer.poll(0)
        self.flush()

    def steady(self, rate: float, duration_s: float, hostile_kinds: list[str] | None = None) -> None:
        """``rate`` valid events/s for ``duration_s`` (or until ``stop``), with ``hostile_kinds``
        spread evenly over the same time; then flush."""
        kinds = list(hostile_kinds or [])
        started = time.monotonic()
        valid_sent = hostile_sent = 0
        while not self.stop.is_set():
            elapsed = time.monotonic() - started
            if elapsed >= duration_s:
                break
            for _ in range(max(int(elapsed * rate) - valid_sent, 0)):
                self.valid()
                valid_sent += 1
            while hostile_sent < len(kinds) and hostile_sent * duration_s / len(kinds) <= elapsed:
                self.hostile(kinds[hostile_sent])
                hostile_sent += 1
            self.producer.poll(0)
            time.sleep(0.02)
        self.flush()

    def steady_in_background(self, rate: float, duration_s: float,
                             hostile_kinds: list[str] | None = None) -> threading.Thread:
        thread = threading.Thread(target=self.steady, args=(rate, duration_s, hostile_kinds),
                                  name="producer", daemon=True)
        thread.start()
        return thread

    def flush(self, timeout_s: float = 120.0) -> None:
        self.producer.flush(timeout_s)

    def snapshot(self) -> list[Sent]:
        with self.lock:
            return list(self.sent)


@dataclass
class Observed:
    """What a subscriber saw: outputs by event id, dead letters by source partition/offset."""

    outputs: dict[str, list[tuple[float, int]]] = field(default_factory=dict)  # id -> [(at, version)]
    dead: dict[tuple[int, int], list[tuple[float, str]]] = field(default_factory=dict)
    dead_unattributed: Counter[str] = field(default_factory=Counter)
    # customer -> [(event_id, from_segment_id, to_segment_id, cause)], in topic order
    changes: dict[str, list[tuple[str, int | None, int, str]]] = field(default_factory=dict)
    unreadable_outputs: int = 0
    unreadable_changes: int = 0  # change records that are not the consumer's (poison, in `poisoned`)
    non_strict_outputs: int = 0  # NaN or Infinity in an output (not JSON by RFC 8259)
    records: int = 0
    last_record_at: float = 0.0


class Collector(threading.Thread):
    """Reads the output and dead-letter topics from the beginning until stopped. One reader per
    topic, so a topic deleted and created again can be re-read from its start (``reset``)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(name="collector", daemon=True)
        self.settings = settings
        self.observed = Observed()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self._resets: set[str] = set()
        topics = [settings.segments_topic, settings.dlq_topic]
        if settings.changes_topic is not None:
            topics.append(settings.changes_topic)
        self._readers = {t: self._reader(t) for t in topics}

    def _reader(self, topic: str) -> Consumer:
        consumer = Consumer({
            **self.settings.kafka_common(), "group.id": f"chaos-collector-{uuid.uuid4().hex}",
            "enable.auto.commit": False, "isolation.level": "read_committed",
            "auto.offset.reset": "earliest", "enable.partition.eof": False,
            "logger": logging.getLogger("chaos.collector"),
        })
        meta = consumer.list_topics(topic, timeout=30).topics[topic]
        consumer.assign([TopicPartition(topic, p, 0) for p in meta.partitions])
        return consumer

    def reset(self, topic: str) -> None:
        """Re-read ``topic`` from offset 0 (after it was deleted and created again)."""
        with self.lock:
            self._resets.add(topic)

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self._apply_resets()
                for topic, reader in self._readers.items():
                    for msg in reader.consume(2000, 0.1):
                        if msg.error() is None:
                            self._observe(topic, msg)
        finally:
            for reader in self._readers.values():
                reader.close()

    def _apply_resets(self) -> None:
        with self.lock:
            resets, self._resets = self._resets, set()
        for topic in resets:
            self._readers[topic].close()
            self._readers[topic] = self._reader(topic)

    def _observe(self, topic: str, msg: Message) -> None:
        at = msg.timestamp()[1] / 1000.0
        with self.lock:
            obs = self.observed
            obs.records += 1
            obs.last_record_at = time.monotonic()
            if topic == self.settings.dlq_topic:
                raw = msg.headers() or []
                headers = dict(raw.items() if isinstance(raw, dict) else raw)
                reason = _text(headers.get("dlq.reason")) or "?"
                try:
                    source = (int(_text(headers.get("dlq.source.partition"))),
                              int(_text(headers.get("dlq.source.offset"))))
                except ValueError:
                    obs.dead_unattributed[reason] += 1
                    return
                obs.dead.setdefault(source, []).append((at, reason))
                return
            if topic == self.settings.changes_topic:
                self._observe_change(msg)
                return
            try:
                record, strict = _loads(msg.value() or b"")
                obs.non_strict_outputs += not strict
                event_id = hostile.traceable_id(str(record.get("event_id") or ""))
                version = int(record.get("model_version", -1))
            except (ValueError, AttributeError, TypeError, RecursionError):
                obs.unreadable_outputs += 1
                return
            obs.outputs.setdefault(event_id, []).append((at, version))

    def _observe_change(self, msg: Message) -> None:
        try:
            record, _ = _loads(msg.value() or b"")
            row = (str(record["event_id"]), record["from_segment_id"], int(record["to_segment_id"]),
                   str(record["cause"]))
        except (ValueError, KeyError, TypeError, RecursionError):
            self.observed.unreadable_changes += 1
            return
        self.observed.changes.setdefault(str(record.get("customer_id")), []).append(row)

    def accounted(self, sent: list[Sent]) -> int:
        """How many of ``sent`` have an output or a dead letter."""
        with self.lock:
            outputs, dead = self.observed.outputs, self.observed.dead
            return sum(1 for s in sent if s.event_id in outputs or (s.partition, s.offset) in dead)

    def idle_s(self) -> float:
        with self.lock:
            last = self.observed.last_record_at
        return time.monotonic() - last if last else float("inf")

    def outputs_since(self, at: float) -> int:
        with self.lock:
            return sum(1 for rows in self.observed.outputs.values() for t, _ in rows if t >= at)


def _loads(raw: bytes | str) -> tuple[dict[str, Any], bool]:
    """An output record, and whether it was strict JSON (no NaN / Infinity).

    >>> _loads(b'{"distance": NaN}')[1]
    False
    """
    constants: list[str] = []

    def constant(name: str) -> float:
        constants.append(name)
        return float(name)

    record = json.loads(raw, parse_constant=constant)
    if not isinstance(record, dict):
        raise ValueError("not an object")
    return record, not constants


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value
