"""One batch along the data flow: decode -> encode -> assign -> output records and dead letters.

No I/O here: the loop hands in Kafka messages and gets back what to produce and what to learn.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from pydantic_core import to_json

from consumer.model import ActiveModel
from segmentation.events import CustomerEvent, Rejection, decode, event_time_iso
from segmentation.scoring import nearest_two
from segmentation.store import CustomerAssignment

Headers = list[tuple[str, str | bytes | None]]


class Message(Protocol):
    """What the loop needs of a confluent_kafka.Message (tests may hand in their own)."""

    def topic(self) -> str | None: ...
    def partition(self) -> int | None: ...
    def offset(self) -> int | None: ...
    def key(self) -> str | bytes | None: ...
    def value(self) -> str | bytes | None: ...
    def headers(
        self,
    ) -> dict[str, str | bytes | None] | Sequence[tuple[str, str | bytes | None]] | None: ...


@dataclass(frozen=True, slots=True)
class OutRecord:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: Headers


@dataclass
class ScoredBatch:
    outputs: list[OutRecord] = field(default_factory=list)
    dead_letters: list[OutRecord] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    customers: list[CustomerAssignment] = field(default_factory=list)
    encoded: np.ndarray = field(default_factory=lambda: np.empty((0, 0)))
    indices: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.intp))
    nearest: np.ndarray = field(default_factory=lambda: np.empty(0))
    second: np.ndarray = field(default_factory=lambda: np.empty(0))
    event_ms: np.ndarray = field(default_factory=lambda: np.empty(0))
    unknown_categories: int = 0


def coordinates(msg: Message) -> tuple[str, int, int]:
    """Topic, partition and offset of a consumed message (always set when it has no error)."""
    return str(msg.topic()), int(msg.partition() or 0), int(msg.offset() or 0)


def dead_letter(msg: Message, rejection: Rejection, dlq_topic: str) -> OutRecord:
    """The original key and bytes unchanged, the reason and the source in headers."""
    original = msg.headers() or []
    headers: Headers = list(original.items() if isinstance(original, dict) else original)
    headers += [
        ("dlq.reason", rejection.reason.encode()),
        ("dlq.detail", rejection.detail.encode()),
        ("dlq.source.topic", str(msg.topic()).encode()),
        ("dlq.source.partition", str(msg.partition()).encode()),
        ("dlq.source.offset", str(msg.offset()).encode()),
    ]
    return OutRecord(dlq_topic, _as_bytes(msg.key()), _as_bytes(msg.value()), headers)


def output_value(
    event: CustomerEvent, event_ms: int, segment_id: int, segment: str, distance: float,
    version: int, scored_at: str,
) -> bytes:
    """The output contract on ``customer-segments``."""
    record: dict[str, Any] = {
        "customer_id": event.customer_id,
        "event_id": event.event_id,
        "event_time": event_time_iso(event_ms),
        "segment_id": segment_id,
        "segment": segment,
        "distance": round(distance, 6),
        "model_version": version,
        "scored_at": scored_at,
    }
    # pydantic-core's serialiser: compact JSON, several times faster than json.dumps here
    return to_json(record)


def score_batch(
    messages: Sequence[Message],
    model: ActiveModel,
    features: tuple[str, ...],
    bounds: Mapping[str, tuple[float, float]],
    segments_topic: str,
    dlq_topic: str,
) -> ScoredBatch:
    batch = ScoredBatch()
    events: list[CustomerEvent] = []
    sources: list[Message] = []
    for msg in messages:
        decoded = decode(_as_bytes(msg.value()), features, bounds)
        if isinstance(decoded, Rejection):
            batch.dead_letters.append(dead_letter(msg, decoded, dlq_topic))
            batch.reasons.append(decoded.reason)
        else:
            events.append(decoded)
            sources.append(msg)
    if not events:
        return batch
    x, batch.unknown_categories = model.bundle.features.encode(events)
    idx, d1, d2 = nearest_two(x, model.centroids)
    batch.encoded, batch.indices, batch.nearest, batch.second = x, idx, d1, d2
    event_ms = [e.event_ms for e in events]
    batch.event_ms = np.asarray(event_ms, dtype=np.float64)
    scored_at = event_time_iso(int(time.time() * 1000))
    names = model.bundle.segment_names
    version = model.version
    segment_ids = model.bundle.segment_ids
    rows = zip(events, event_ms, sources, idx.tolist(), d1.tolist(), strict=True)
    for event, ms, msg, i, dist in rows:
        sid = segment_ids[i]
        value = output_value(event, ms, sid, names[i], dist, version, scored_at)
        batch.outputs.append(
            OutRecord(segments_topic, event.customer_id.encode(), value, [])
        )
        batch.customers.append(CustomerAssignment(
            customer_id=event.customer_id, event_ms=ms, offset=coordinates(msg)[2],
            segment_id=sid, segment=names[i], model_version=version,
            event_id=event.event_id or "",
        ))
    return batch


def _as_bytes(v: str | bytes | None) -> bytes | None:
    return v.encode() if isinstance(v, str) else v
