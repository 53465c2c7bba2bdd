"""The training window: recent events read straight from the input topic (Kafka is the record of
truth, there is no copy), one row per customer (their latest event), capped by uniform sampling
so that the cost of a fit does not grow with traffic."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
from confluent_kafka import OFFSET_END, Consumer, KafkaError, TopicPartition

from segmentation.bundle import PartitionRange
from segmentation.events import CustomerEvent, decode
from segmentation.kafka import reader_config
from segmentation.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Window:
    events: list[CustomerEvent]
    ranges: list[PartitionRange]
    start_ms: int
    end_ms: int
    rows_read: int = 0
    rows_invalid: int = 0
    invalid_reasons: dict[str, int] = field(default_factory=dict)


def window_ranges(
    consumer: Consumer, topic: str, start_ms: int, timeout_s: float = 10.0
) -> list[PartitionRange]:
    """Per partition: the first offset at or after ``start_ms`` up to the high watermark now."""
    meta = consumer.list_topics(topic, timeout=timeout_s).topics[topic]
    if meta.error is not None:
        raise RuntimeError(f"topic {topic}: {meta.error}")
    partitions = [TopicPartition(topic, p, start_ms) for p in sorted(meta.partitions)]
    starts = consumer.offsets_for_times(partitions, timeout=timeout_s)
    ranges = []
    for tp in starts:
        _, high = consumer.get_watermark_offsets(tp, timeout=timeout_s, cached=False)
        # offsets_for_times answers -1 (OFFSET_END) when no message is that recent.
        start = high if tp.offset in (OFFSET_END, -1) else tp.offset
        ranges.append(PartitionRange(partition=tp.partition, start=start, end=high))
    return ranges


def read_ranges(
    settings: Settings, ranges: list[PartitionRange], timeout_s: float = 120.0
) -> tuple[list[bytes | None], int]:
    """Every message value in the given offset ranges, in (partition, offset) order; also
    returns how many were read.

    The broker interleaves partitions differently on every read, and both the per-customer
    de-duplication and k-means++ depend on row order, so the order is fixed here: the same
    ranges give the same training matrix (and ``reproduce`` the same centroids)."""
    consumer = Consumer(reader_config(settings, "trainer"))
    todo = {r.partition: r for r in ranges if r.end > r.start}
    read: list[tuple[int, int, bytes | None]] = []
    try:
        if not todo:
            return [], 0
        consumer.assign(
            [TopicPartition(settings.events_topic, r.partition, r.start) for r in todo.values()]
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
                        continue
                    raise RuntimeError(f"window read: {err}")
                r = None if p is None or offset is None else todo.get(p)
                if r is None or offset is None or offset >= r.end:
                    continue
                read.append((r.partition, offset, msg.value()))
                if offset >= r.end - 1:
                    todo.pop(r.partition)
    finally:
        consumer.close()
    read.sort(key=lambda m: (m[0], m[1]))
    return [value for _, _, value in read], len(read)


def latest_per_customer(events: list[CustomerEvent]) -> list[CustomerEvent]:
    """One row per customer: the latest event (segments are of customers, not of events).

    >>> a1 = CustomerEvent(customer_id="a", event_time=1, features={"x": 1})
    >>> a2 = CustomerEvent(customer_id="a", event_time=2, features={"x": 2})
    >>> b = CustomerEvent(customer_id="b", event_time=1, features={"x": 3})
    >>> [e.features["x"] for e in latest_per_customer([a2, b, a1])]
    [2, 3]
    """
    latest: dict[str, CustomerEvent] = {}
    for event in events:
        kept = latest.get(event.customer_id)
        if kept is None or event.event_ms >= kept.event_ms:
            latest[event.customer_id] = event
    return list(latest.values())


def sample_rows(n: int, cap: int, random_state: int) -> np.ndarray:
    """Sorted indices of a uniform sample of at most ``cap`` rows out of ``n``.

    >>> sample_rows(5, 10, 0).tolist()
    [0, 1, 2, 3, 4]
    >>> len(sample_rows(1000, 10, 0))
    10
    """
    if n <= cap:
        return np.arange(n)
    return np.sort(np.random.default_rng(random_state).choice(n, size=cap, replace=False))


def read_window(
    settings: Settings,
    now_ms: int | None = None,
    ranges: list[PartitionRange] | None = None,
) -> Window:
    """Read, validate, de-duplicate per customer and sample the training window.

    With ``ranges`` (from a bundle's lineage) the exact same messages are read again."""
    end_ms = now_ms if now_ms is not None else int(time.time() * 1000)
    start_ms = end_ms - settings.window_s * 1000
    if ranges is None:
        probe = Consumer(reader_config(settings, "trainer-probe"))
        try:
            ranges = window_ranges(probe, settings.events_topic, start_ms)
        finally:
            probe.close()
    values, rows_read = read_ranges(settings, ranges)
    events: list[CustomerEvent] = []
    reasons: dict[str, int] = {}
    bounds = settings.feature_ranges()
    for value in values:
        decoded = decode(value, settings.features, bounds)
        if isinstance(decoded, CustomerEvent):
            events.append(decoded)
        else:
            reasons[decoded.reason] = reasons.get(decoded.reason, 0) + 1
    customers = latest_per_customer(events)
    keep = sample_rows(len(customers), settings.max_rows, settings.random_state)
    window = Window(
        events=[customers[i] for i in keep],
        ranges=ranges,
        start_ms=start_ms,
        end_ms=end_ms,
        rows_read=rows_read,
        rows_invalid=sum(reasons.values()),
        invalid_reasons=reasons,
    )
    log.info(
        "window read",
        extra={"rows_read": rows_read, "invalid": window.rows_invalid,
               "customers": len(customers), "rows_used": len(window.events)},
    )
    return window
