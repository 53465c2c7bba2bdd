"""One batch along the data flow: decode -> encode -> assign -> output records and dead letters.

No I/O here (a test holds it: importing this module loads no Kafka, Redis or metrics client):
the loop hands in Kafka messages and gets back a ``ScoredBatch``, a value.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import msgspec
import numpy as np
from pydantic_core import to_json

from consumer.model import ActiveModel
from segmentation.cluster_metrics import nearest_two
from segmentation.customer import CustomerAssignment
from segmentation.events import (
    DecodedEvent,
    Event,
    InputContract,
    KafkaMessage,
    Rejection,
    event_time_iso,
    raw_numeric,
)

Headers = list[tuple[str, str | bytes | None]]


class Message(KafkaMessage, Protocol):
    """What the loop needs of a consumed message (a confluent_kafka.Message, or a test's own):
    what decoding needs (``segmentation.events.KafkaMessage``) and where it was read."""

    def topic(self) -> str | None: ...
    def partition(self) -> int | None: ...
    def offset(self) -> int | None: ...


class OutRecord(msgspec.Struct, frozen=True):
    """A record to produce (one or two per scored event, so a msgspec struct: cheap to build)."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: Headers
    source: Message | None = None  # the consumed message this record answers
    partition: int | None = None  # None: the producer's partitioner (by key)


@dataclass(frozen=True, slots=True)
class ScoringRules:
    """What one message is checked against and where its records go."""

    contract: InputContract
    segments_topic: str
    dlq_topic: str
    max_record_bytes: int

    def replacement(self, record: OutRecord, error: str) -> OutRecord | None:
        """What to write instead of a record the broker refused for good: a dead letter of the
        output's source, or a dead letter stripped of key and value; ``None`` if nothing is left."""
        if record.topic == self.dlq_topic:
            return stripped_dead_letter(record)
        if record.source is None:
            return None
        rejection = Rejection("output_rejected", f"the broker refused the output record: {error}")
        return dead_letter(record.source, rejection, self.dlq_topic, self.max_record_bytes, error)


@dataclass(frozen=True, slots=True)
class ScoredBatch:
    """What scoring made of a batch (a value: no later stage writes into it). Per scored event,
    row for row: its output record, customer assignment, event, encoded row, nearest segment
    index and the two nearest distances, event time, and whether it is an outlier (beyond its
    segment's outlier radius or outside the training envelope: flagged in its records, never
    learned) or novel (beyond its segment's training p99). Per rejected message: its dead letter
    and reason."""

    outputs: tuple[OutRecord, ...] = ()
    dead_letters: tuple[OutRecord, ...] = ()
    reasons: tuple[str, ...] = ()
    customers: tuple[CustomerAssignment, ...] = ()
    events: tuple[Event, ...] = ()
    encoded: np.ndarray = field(default_factory=lambda: np.empty((0, 0)))
    indices: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.intp))
    nearest: np.ndarray = field(default_factory=lambda: np.empty(0))
    second: np.ndarray = field(default_factory=lambda: np.empty(0))
    event_ms: np.ndarray = field(default_factory=lambda: np.empty(0))
    outliers: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=bool))
    novel: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=bool))
    unknown_categories: int = 0

    @property
    def records(self) -> list[OutRecord]:
        """What to produce for it: the outputs, then the dead letters."""
        return [*self.outputs, *self.dead_letters]


ROWS = ("encoded", "indices", "nearest", "second", "event_ms", "outliers", "novel")


def joined(parts: Sequence[ScoredBatch], rejected: Sequence[tuple[OutRecord, str]]) -> ScoredBatch:
    """One batch of the scored ``parts`` (in order) and the ``rejected`` messages' dead letters.

    >>> joined([], []).outputs, joined([], [(OutRecord("dlq", None, None, []), "not_json")]).reasons
    ((), ('not_json',))
    """
    scored = [p for p in parts if p.outputs]
    rows: dict[str, Any] = {}
    if len(scored) > 1:
        rows = {name: np.concatenate([getattr(p, name) for p in scored]) for name in ROWS}
    whole = scored[0] if len(scored) == 1 else ScoredBatch(
        outputs=tuple(r for p in scored for r in p.outputs),
        customers=tuple(c for p in scored for c in p.customers),
        events=tuple(e for p in scored for e in p.events),
        unknown_categories=sum(p.unknown_categories for p in scored), **rows,
    )
    if not rejected:
        return whole
    return replace(whole, dead_letters=tuple(record for record, _ in rejected),
                   reasons=tuple(reason for _, reason in rejected))


def coordinates(msg: Message) -> tuple[str, int, int]:
    """Topic, partition and offset of a consumed message (always set when it has no error)."""
    return str(msg.topic()), int(msg.partition() or 0), int(msg.offset() or 0)


MAX_DETAIL_CHARS = 1000
MAX_COPIED_HEADER_BYTES = 16_384
RECORD_OVERHEAD_BYTES = 4096  # batch and record framing, our own headers


def dead_letter(msg: Message, rejection: Rejection, dlq_topic: str, max_bytes: int = 1_000_000,
                error: str | None = None) -> OutRecord:
    """The original key and bytes unchanged when they fit under ``max_bytes``; otherwise a prefix
    with the original sizes and sha256 in headers. The reason and the source in headers; every
    header bounded.

    >>> class M:
    ...     def topic(self): return "in"
    ...     def partition(self): return 0
    ...     def offset(self): return 7
    ...     def key(self): return b"k"
    ...     def value(self): return b"v" * 50_000
    ...     def headers(self): return None
    >>> small = dead_letter(M(), Rejection("too_large", "x" * 5000), "dlq", max_bytes=20_000)
    >>> record_bytes(small) <= 20_000 - RECORD_OVERHEAD_BYTES, small.value == b"v" * len(small.value)
    (True, True)
    >>> dict(small.headers)["dlq.original.value.bytes"], len(dict(small.headers)["dlq.detail"])
    (b'50000', 1000)
    """
    key, value = _as_bytes(msg.key()), _as_bytes(msg.value())
    headers, dropped = _bounded_headers(msg.headers())
    headers += [
        ("dlq.reason", rejection.reason.encode()),
        ("dlq.detail", rejection.detail[:MAX_DETAIL_CHARS].encode()),
        ("dlq.source.topic", str(msg.topic())[:255].encode()),
        ("dlq.source.partition", str(msg.partition()).encode()),
        ("dlq.source.offset", str(msg.offset()).encode()),
    ]
    if error is not None:
        headers.append(("dlq.error", error[:MAX_DETAIL_CHARS].encode()))
    if dropped:
        headers.append(("dlq.headers.dropped", str(dropped).encode()))
    if len(key or b"") + len(value or b"") > _room(max_bytes, headers):
        headers += _fingerprint("key", key) + _fingerprint("value", value)
        headers.append(("dlq.truncated", b"true"))
        key = None if key is None else key[:1024]
        value = None if value is None else value[: max(_room(max_bytes, headers) - len(key or b""), 0)]
    return OutRecord(dlq_topic, key, value, headers, msg)


def record_bytes(record: OutRecord) -> int:
    """Key, value and header bytes of a record (without Kafka's framing)."""
    return len(record.key or b"") + len(record.value or b"") + sum(
        len(k) + len(v or b"") for k, v in record.headers
    )


def _room(max_bytes: int, headers: Headers) -> int:
    return max_bytes - RECORD_OVERHEAD_BYTES - sum(len(k) + len(v or b"") for k, v in headers)


def stripped_dead_letter(record: OutRecord) -> OutRecord | None:
    """A dead letter the broker refused, without key and value (its headers say what they
    were); ``None`` when it is already stripped."""
    if record.key is None and record.value is None:
        return None
    headers = [h for h in record.headers if not h[0].startswith("dlq.original.")]
    headers += _fingerprint("key", record.key) + _fingerprint("value", record.value)
    return OutRecord(record.topic, None, None, headers, record.source)


def _fingerprint(name: str, data: bytes | None) -> Headers:
    if data is None:
        return []
    return [(f"dlq.original.{name}.bytes", str(len(data)).encode()),
            (f"dlq.original.{name}.sha256", hashlib.sha256(data).hexdigest().encode())]


def _bounded_headers(
    original: dict[str, str | bytes | None] | Sequence[tuple[str, str | bytes | None]] | None,
) -> tuple[Headers, int]:
    """The message's own headers, as many as fit in ``MAX_COPIED_HEADER_BYTES``, without any
    ``dlq.*`` header (a message re-produced from the dead-letter topic): every ``dlq.*`` header of
    a dead letter is the service's own, about this rejection. The number left out is returned."""
    items = list(original.items() if isinstance(original, dict) else original or [])
    kept: Headers = []
    used = 0
    for name, value in items:
        size = len(name) + len(value or b"")
        if used + size > MAX_COPIED_HEADER_BYTES or name.startswith("dlq."):
            continue
        kept.append((name, value))
        used += size
    return kept, len(items) - len(kept)


def output_value(
    event: Event, event_ms: int, segment_id: int, segment: str, distance: float,
    version: int, scored_at: str, event_time: str | None = None, outlier: bool = False,
) -> bytes:
    """The output contract on ``customer-segments``: compact JSON, byte for byte what
    pydantic-core's ``to_json`` gives for the dict of these fields (tested), built as one string
    (``event_time``: ``event_time_iso(event_ms)`` when the caller formatted it already).

    >>> from segmentation.events import CustomerEvent
    >>> e = CustomerEvent(customer_id="c-1", event_time=1000, event_id=None, features={})
    >>> output_value(e, 1000, 2, "vip", 0.12345678, 7, "1970-01-01T00:00:02.000Z")
    b'{"customer_id":"c-1","event_id":null,"event_time":"1970-01-01T00:00:01.000Z","segment_id":2,"segment":"vip","distance":0.123457,"outlier":false,"model_version":7,"scored_at":"1970-01-01T00:00:02.000Z"}'
    """
    _check_finite(distance, segment_id)
    return (
        f'{{"customer_id":{json_string(event.customer_id)},"event_id":{json_string(event.event_id)},'
        f'"event_time":"{event_time or event_time_iso(event_ms)}","segment_id":{int(segment_id)},'
        f'"segment":{json_string(segment)},"distance":{json_number(round(distance, 6))},'
        f'"outlier":{"true" if outlier else "false"},'
        f'"model_version":{int(version)},"scored_at":{json_string(scored_at)}}}'
    ).encode()


def score_batch(
    messages: Sequence[Message], model: ActiveModel, rules: ScoringRules, now_ms: int | None = None,
) -> ScoredBatch:
    """Every message becomes exactly one output or one dead letter, whatever it holds: an
    exception while handling one message dead-letters that message (``internal_error``)."""
    now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
    rejected: list[tuple[OutRecord, str]] = []
    events: list[Event] = []
    sources: list[Message] = []
    for msg, decoded in zip(messages, decode_batch(messages, rules.contract, now_ms), strict=True):
        if isinstance(decoded, Rejection):
            rejected.append((_dead_letter(msg, decoded, rules), decoded.reason))
        else:
            events.append(decoded)
            sources.append(msg)
    try:
        parts = [assign_events(events, sources, model, rules, now_ms)]
    except Exception:  # noqa: BLE001 - find the one event that fails, score the others
        parts = []
        for event, msg in zip(events, sources, strict=True):
            try:
                parts.append(assign_events([event], [msg], model, rules, now_ms))
            except Exception as exc:  # noqa: BLE001
                rejection = _internal_error(exc)
                rejected.append((_dead_letter(msg, rejection, rules, type(exc).__name__), rejection.reason))
    return joined(parts, rejected)


def decode_batch(
    messages: Sequence[Message], contract: InputContract, now_ms: int
) -> list[DecodedEvent | Rejection]:
    """``InputContract.decode_batch``; should anything raise, message by message, where an
    exception dead-letters its one message."""
    try:
        return contract.decode_batch(messages, now_ms)
    except Exception:  # noqa: BLE001 - the safety net below finds the message
        return [_decode_one(msg, contract, now_ms) for msg in messages]


def _decode_one(msg: Message, contract: InputContract, now_ms: int) -> DecodedEvent | Rejection:
    try:
        return contract.decode_message(msg, now_ms)
    except Exception as exc:  # noqa: BLE001 - the safety net: one message, never the batch
        return _internal_error(exc)


def assign_events(
    events: Sequence[Event], sources: Sequence[Message], model: ActiveModel,
    rules: ScoringRules, now_ms: int,
) -> ScoredBatch:
    """Encode, assign the nearest segment, flag outliers and novel events, and build the output
    records (vectorised)."""
    if not events:
        return ScoredBatch()
    raw = raw_numeric(events, model.bundle.features.numeric)
    x, unknown = model.bundle.features.encode(events, raw)
    idx, d1, d2 = nearest_two(x, model.centroids)
    outliers = outliers_of(raw, model, idx, d1)
    event_ms = [e.event_ms for e in events]
    values = output_values(events, event_ms, idx, d1, model, event_time_iso(now_ms), outliers)
    topic, names, version = rules.segments_topic, model.bundle.segment_names, model.version
    segment_ids = [model.bundle.segment_ids[i] for i in idx.tolist()]
    return ScoredBatch(
        outputs=tuple(OutRecord(topic, e.customer_id.encode(), v, [], m)
                      for e, v, m in zip(events, values, sources, strict=True)),
        customers=tuple(
            CustomerAssignment(customer_id=e.customer_id, event_ms=ms, offset=int(m.offset() or 0),
                               segment_id=sid, segment=names[i], model_version=version,
                               event_id=e.event_id or "")
            for e, ms, m, sid, i in zip(events, event_ms, sources, segment_ids, idx.tolist(), strict=True)
        ),
        events=tuple(events), encoded=x, indices=idx, nearest=d1, second=d2,
        event_ms=np.asarray(event_ms, dtype=np.float64), outliers=outliers,
        novel=beyond(d1, idx, model.radius_p99), unknown_categories=unknown,
    )


def output_values(
    events: Sequence[Event], event_ms: Sequence[int], indices: np.ndarray,
    distances: np.ndarray, model: ActiveModel, scored_at: str, outliers: np.ndarray | None = None,
) -> list[bytes]:
    """``output_value`` of every event of a batch (tested byte for byte): what is the same for
    many events (the segment's fields, ``scored_at``) is written once, and the ids are escaped
    per batch when none needs it.
    """
    ids, names = model.bundle.segment_ids, model.bundle.segment_names
    index = indices.tolist()
    for row in np.flatnonzero(~np.isfinite(distances)).tolist():  # the first one raises
        _check_finite(float(distances[row]), ids[index[row]])
    segment = {i: f'"segment_id":{int(ids[i])},"segment":{json_string(names[i])}' for i in set(index)}
    tail = f'"model_version":{int(model.version)},"scored_at":{json_string(scored_at)}}}'
    flags = (["false"] * len(events) if outliers is None
             else ["true" if o else "false" for o in outliers.tolist()])
    rows = zip(json_strings([e.customer_id for e in events]), json_strings([e.event_id for e in events]),
               event_times_iso(event_ms), index, distances.tolist(), flags, strict=True)
    return [(f'{{"customer_id":{c},"event_id":{e},"event_time":"{t}",{segment[i]},'
             f'"distance":{json_number(round(d, 6))},"outlier":{o},{tail}').encode()
            for c, e, t, i, d, o in rows]


def _check_finite(distance: float, segment_id: int) -> None:
    """A distance the output contract can carry (JSON has no NaN or infinity)."""
    if not math.isfinite(distance):
        raise ValueError(f"non-finite distance {distance} for segment {segment_id}")


def beyond(distances: np.ndarray, indices: np.ndarray, radii: np.ndarray | None) -> np.ndarray:
    """Per event, whether its distance exceeds the radius of its segment (by segment index);
    without radii (a bundle trained before they existed), none is.

    >>> beyond(np.array([0.5, 2.0, 2.0]), np.array([0, 0, 1]), np.array([1.0, 3.0])).tolist()
    [False, True, False]
    >>> beyond(np.array([9.0]), np.array([0]), None).tolist()
    [False]
    """
    if radii is None:
        return np.zeros(distances.shape[0], dtype=bool)
    return np.asarray(distances > radii[indices])


def outliers_of(
    raw: np.ndarray, model: ActiveModel, indices: np.ndarray, distances: np.ndarray,
) -> np.ndarray:
    """Per event, whether it is an outlier: farther from its nearest centroid than that
    segment's outlier radius, or with a raw feature outside the training envelope. Both limits
    come from the trainer that fills the radii: a bundle without them flags none."""
    if model.radius_outlier is None:
        return np.zeros(raw.shape[0], dtype=bool)
    far = beyond(distances, indices, model.radius_outlier)
    spec = model.bundle.features
    if spec.clip_low is None or spec.clip_high is None:  # no envelope: the raw matrix is not needed
        return far
    return far | spec.outside_envelope(raw)


def json_string(text: str | None) -> str:
    """``to_json`` of a string (or ``null``), without the call when nothing needs escaping.

    >>> json_string("c-1"), json_string('a"b'), json_string("é"), json_string(None)
    ('"c-1"', '"a\\\\"b"', '"é"', 'null')
    """
    if text is None:
        return "null"
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return f'"{text}"'
    return to_json(text).decode()


def json_strings(texts: Sequence[str | None]) -> list[str]:
    """``json_string`` of each, checked once for the whole batch when none needs escaping.

    >>> json_strings(["c-1", None]), json_strings(["a", 'b"'])
    (['"c-1"', 'null'], ['"a"', '"b\\\\""'])
    """
    joined = "".join(t for t in texts if t is not None)
    if joined.isascii() and joined.isprintable() and '"' not in joined and "\\" not in joined:
        return ["null" if t is None else f'"{t}"' for t in texts]
    return [json_string(t) for t in texts]


def json_number(value: float) -> str:
    """``to_json`` of a float: Python's ``repr`` where the two agree (plain notation).

    >>> json_number(0.4213), json_number(0.0), json_number(3e-06), json_number(1e20)
    ('0.4213', '0.0', '3e-6', '1e+20')
    """
    if value == 0.0 or 1e-4 <= abs(value) < 1e15:
        return repr(value)
    return to_json(value).decode()


# Below 2**32 s from the epoch a float of seconds is exact to a fraction of a microsecond, so
# ``event_time_iso`` (through ``datetime.fromtimestamp``) is the millisecond value itself.
_EXACT_ISO_MS = 2**32 * 1000


def event_times_iso(event_ms: Sequence[int]) -> list[str]:
    """``event_time_iso`` of many times at once (numpy's formatter; the rare time far from the
    epoch one by one).

    >>> event_times_iso([1000, -1, 253402300799999])
    ['1970-01-01T00:00:01.000Z', '1969-12-31T23:59:59.999Z', '9999-12-31T23:59:59.998Z']
    """
    ms = np.asarray(event_ms, dtype=np.int64)
    times = [t + "Z" for t in np.datetime_as_string(ms.astype("datetime64[ms]"), unit="ms").tolist()]
    for i in np.flatnonzero(np.abs(ms) >= _EXACT_ISO_MS).tolist():
        times[i] = event_time_iso(int(ms[i]))
    return times


def _internal_error(exc: BaseException) -> Rejection:
    return Rejection("internal_error", f"{type(exc).__name__}: {exc}")


def _dead_letter(
    msg: Message, rejection: Rejection, rules: ScoringRules, error: str | None = None
) -> OutRecord:
    return dead_letter(msg, rejection, rules.dlq_topic, rules.max_record_bytes, error)


def _as_bytes(v: str | bytes | None) -> bytes | None:
    return v.encode() if isinstance(v, str) else v
