"""The training window: recent events read straight from the input topic (Kafka is the record of
truth, there is no copy), one row per customer (their latest event), capped by a uniform sample
of customers taken while reading, so that neither the memory nor the cost of a fit grows with
traffic.

Which customers the sample keeps cannot be steered from outside: their hashes are keyed with a
secret (``SampleKey``), never with anything written in a bundle.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import secrets
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from confluent_kafka import OFFSET_END, Consumer, KafkaError, Message, TopicPartition
from pydantic import SecretStr

from segmentation.bundle import PartitionRange
from segmentation.events import Event, InputContract, Rejection
from segmentation.kafka import is_transient, retrying

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampleKey:
    """The secret key of the sample's hashes: ``SEG_SAMPLE_SALT`` (one per deployment) or, when
    unset, a fresh random key per run. Anyone who knows the key can craft customer ids that
    the sample always keeps, so it is never recorded; ``fingerprint`` (a hash of it) is.

    >>> run, again = SampleKey.per_run(), SampleKey.per_run()
    >>> run.source, run.fingerprint != again.fingerprint, len(run.fingerprint)
    ('run', True, 64)
    >>> SampleKey.of_secret("0123456789abcdef").fingerprint[:12]
    '5dbd4f6e325e'
    """

    key: bytes = field(repr=False)
    source: Literal["deployment", "run"]

    @classmethod
    def per_run(cls) -> SampleKey:
        return cls(secrets.token_bytes(32), "run")

    @classmethod
    def of_secret(cls, secret: str) -> SampleKey:
        return cls(hashlib.sha256(secret.encode()).digest(), "deployment")

    @classmethod
    def of(cls, salt: SecretStr | None) -> SampleKey:
        """The deployment's key if ``salt`` (``SEG_SAMPLE_SALT``) is set, else a fresh one."""
        return cls.per_run() if salt is None else cls.of_secret(salt.get_secret_value())

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the key: tells which key a run used without telling the key."""
        return hashlib.sha256(self.key).hexdigest()


@dataclass(frozen=True)
class WindowConfig:
    """What reading a training window depends on: the input ``topic``, how far back
    (``window_s``), the customer cap (``max_rows``), the input ``contract`` rows are validated
    with, the sample's secret ``sample_salt`` (None: a fresh key per read), and the consumer
    configurations of the ``reader`` and of the ``probe`` that finds the offsets.
    ``max_abs_feature`` bounds a feature the contract has no bounds for (``for_run``)."""

    topic: str
    window_s: int
    max_rows: int
    contract: InputContract
    max_abs_feature: float
    sample_salt: SecretStr | None = None
    reader: Mapping[str, Any] = field(default_factory=dict, repr=False)
    probe: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def sample_key(self) -> SampleKey:
        return SampleKey.of(self.sample_salt)

    def for_run(self, topic: str, features: Sequence[str], max_rows: int) -> WindowConfig:
        """This configuration reading a recorded run's window again: its ``topic`` and numeric
        ``features`` (the configured bounds of those configured, +/-``max_abs_feature`` for the
        others), at most ``max_rows`` customers.

        >>> config = WindowConfig("events", 60, 10, InputContract(("x",), {"x": (0.0, 1.0)}), 5.0)
        >>> run = config.for_run("old-events", ["x", "y"], 3)
        >>> run.topic, run.max_rows, run.contract.features, dict(run.contract.bounds)
        ('old-events', 3, ('x', 'y'), {'x': (0.0, 1.0), 'y': (-5.0, 5.0)})
        """
        default = (-self.max_abs_feature, self.max_abs_feature)
        bounds = {name: self.contract.bounds.get(name, default) for name in features}
        contract = replace(self.contract, features=tuple(features), bounds=bounds)
        return replace(self, topic=topic, max_rows=max_rows, contract=contract)


@dataclass
class Window:
    events: list[Event]
    ranges: list[PartitionRange]
    start_ms: int
    end_ms: int
    rows_read: int = 0
    rows_invalid: int = 0
    invalid_reasons: dict[str, int] = field(default_factory=dict)
    sampled: bool = False  # more customers than max_rows: which were kept depends on the key
    key: SampleKey = field(default_factory=SampleKey.per_run, repr=False)

    def sample_record(self) -> dict[str, Any]:
        """How the sample was drawn, for the bundle's lineage (the key's hash, never the key)."""
        return {"salt": self.key.source, "salt_sha256": self.key.fingerprint, "sampled": self.sampled}


def window_ranges(
    consumer: Consumer, topic: str, start_ms: int, timeout_s: float = 10.0
) -> list[PartitionRange]:
    """Per partition: the first offset at or after ``start_ms`` up to the high watermark now.
    Transient errors (a leader moving, a broker restarting) are retried; a partition that
    answers with an error of its own fails the run with that error."""
    meta = retrying(lambda: consumer.list_topics(topic, timeout=timeout_s), "list_topics")
    described = meta.topics[topic]
    if described.error is not None:
        raise RuntimeError(f"topic {topic}: {described.error}")
    partitions = [TopicPartition(topic, p, start_ms) for p in sorted(described.partitions)]
    starts = retrying(lambda: consumer.offsets_for_times(partitions, timeout=timeout_s),
                      "offsets_for_times")
    ranges = []
    for tp in starts:
        if tp.error is not None:
            raise RuntimeError(f"offsets_for_times {topic}[{tp.partition}]: {tp.error}")
        _, high = _high_watermark(consumer, tp, timeout_s)
        # offsets_for_times answers -1 (OFFSET_END) when no message is that recent.
        start = high if tp.offset in (OFFSET_END, -1) else tp.offset
        ranges.append(PartitionRange(partition=tp.partition, start=start, end=high))
    return ranges


def _high_watermark(consumer: Consumer, tp: TopicPartition, timeout_s: float) -> tuple[int, int]:
    watermarks: tuple[int, int] = retrying(
        lambda: consumer.get_watermark_offsets(tp, timeout=timeout_s, cached=False),
        "get_watermark_offsets",
    )
    return watermarks


Position = tuple[int, int]  # partition, offset


def iter_ranges(
    config: WindowConfig, ranges: list[PartitionRange], timeout_s: float = 120.0
) -> Iterator[tuple[Position, Message]]:
    """Every message in the given offset ranges with its position, streamed (memory does not
    grow with the window). Transient errors are retried by the client; others fail the read."""
    todo = {r.partition: r for r in ranges if r.end > r.start}
    if not todo:
        return
    consumer = Consumer(dict(config.reader))
    try:
        consumer.assign(
            [TopicPartition(config.topic, r.partition, r.start) for r in todo.values()]
        )
        deadline = time.monotonic() + timeout_s
        while todo:
            if time.monotonic() > deadline:
                raise TimeoutError(f"window read incomplete, partitions left: {sorted(todo)}")
            for msg in consumer.consume(num_messages=5000, timeout=0.5):
                p, offset, err = msg.partition(), msg.offset(), msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF and p is not None:
                        todo.pop(p, None)
                    elif is_transient(err):
                        log.warning("window read: transient error", extra={"error": err.str()})
                    else:
                        raise RuntimeError(f"window read: {err}")
                    continue
                r = None if p is None or offset is None else todo.get(p)
                if r is None or offset is None or offset >= r.end:
                    continue
                yield (r.partition, offset), msg
                if offset >= r.end - 1:
                    todo.pop(r.partition)
    finally:
        consumer.close()


class CustomerSample:
    """The latest event of a uniform sample of at most ``cap`` customers, in memory bounded by
    ``cap`` however many events are read (segments are of customers, not of events).

    Bottom-k sampling: a customer is kept while its keyed hash (BLAKE2b with ``key``, secret)
    is among the ``cap`` smallest seen. The sample is a function of the set of events and the
    key, not of the read order (the broker interleaves partitions differently on every read), so
    the same ranges and key give the same training matrix, and an evicted customer can never
    come back. With at most ``cap`` customers every one is kept, whatever the key.

    >>> from segmentation.events import DecodedEvent
    >>> s = CustomerSample(cap=2, key=b"k" * 32)
    >>> for i, cid in enumerate("abcab"):
    ...     s.offer(DecodedEvent(customer_id=cid, event_ms=i, features={"x": i}), (0, i))
    >>> sorted((e.customer_id, e.features["x"]) for e in s.events()), s.customers_seen, s.sampled
    ([('a', 3), ('c', 2)], 3, True)
    """

    def __init__(self, cap: int, key: bytes) -> None:
        self.cap = cap
        self._key = key
        self._kept: dict[str, tuple[tuple[int, int, int], Event]] = {}
        self._largest: list[tuple[int, str]] = []  # max-heap (negated) of the kept hashes
        self._seen: set[int] = set()  # only to report how many customers there were
        self._rows = 0

    def _hash(self, customer_id: str) -> int:
        digest = hashlib.blake2b(customer_id.encode(), digest_size=8, key=self._key).digest()
        return int.from_bytes(digest, "little")

    def offer(self, event: Event, position: Position) -> None:
        cid = event.customer_id
        order = (event.event_ms, *position)  # latest event wins; ties by position
        kept = self._kept.get(cid)
        if kept is not None:
            if order > kept[0]:
                self._kept[cid] = (order, event)
            return
        h = self._hash(cid)
        if len(self._seen) < 4 * self.cap:
            self._seen.add(h)
        if len(self._kept) >= self.cap:
            if h >= -self._largest[0][0]:
                return
            _, evicted = heapq.heappop(self._largest)
            del self._kept[evicted]
        heapq.heappush(self._largest, (-h, cid))
        self._kept[cid] = (order, event)

    @property
    def customers_seen(self) -> int:
        """Distinct customers offered (counted exactly up to 4 x cap, then a lower bound)."""
        return len(self._seen)

    @property
    def sampled(self) -> bool:
        """Whether some customer was left out (more than ``cap`` were offered)."""
        return self.customers_seen > self.cap

    def events(self) -> list[Event]:
        """The kept events in (partition, offset) order."""
        return [event for _, event in sorted(self._kept.values(), key=lambda kv: kv[0][1:])]


def read_window(
    config: WindowConfig,
    now_ms: int | None = None,
    ranges: list[PartitionRange] | None = None,
    key: SampleKey | None = None,
) -> Window:
    """Read, validate (the consumer's own input contract), keep each sampled customer's latest
    event. With ``ranges`` (from a bundle's lineage) the exact same messages are read again; the
    same customers are kept if ``key`` (default ``config.sample_key()``) is the run's, or if
    the window was not ``sampled``."""
    key = key or config.sample_key()
    end_ms = now_ms if now_ms is not None else int(time.time() * 1000)
    start_ms = end_ms - config.window_s * 1000
    if ranges is None:
        probe = Consumer(dict(config.probe))
        try:
            ranges = window_ranges(probe, config.topic, start_ms)
        finally:
            probe.close()
    contract = config.contract
    sample = CustomerSample(config.max_rows, key.key)
    reasons: dict[str, int] = {}
    rows_read = 0
    for position, msg in iter_ranges(config, ranges):
        rows_read += 1
        try:
            decoded = contract.decode_message(msg, now_ms=end_ms)
        except Exception as exc:  # noqa: BLE001 - one message never fails a training run
            log.warning("window row could not be decoded", extra={"error": repr(exc)[:200]})
            decoded = Rejection("internal_error", type(exc).__name__)
        if not isinstance(decoded, Rejection):
            sample.offer(decoded, position)
        else:
            reasons[decoded.reason] = reasons.get(decoded.reason, 0) + 1
    window = Window(
        events=sample.events(),
        ranges=ranges,
        start_ms=start_ms,
        end_ms=end_ms,
        rows_read=rows_read,
        rows_invalid=sum(reasons.values()),
        invalid_reasons=reasons,
        sampled=sample.sampled,
        key=key,
    )
    log.info(
        "window read",
        extra={"rows_read": rows_read, "invalid": window.rows_invalid,
               "customers_seen": sample.customers_seen, "rows_used": len(window.events)},
    )
    return window
