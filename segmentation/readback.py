"""Records read back: what the service reads from its own topics (``segment-models``,
``customer-segment-changes``) and Redis keys is untrusted input, like an event. Anything that can
reach the broker or Redis can write there, and a record that crashes its reader is read again at
every rebuild, by every replica that takes it over.

So every such record is decoded here before it is used: its size and its nesting depth are checked
on the bytes, before a JSON parser sees them (Python's ``json`` raises ``RecursionError`` on deep
nesting), then its fields are validated per record kind. The only error is ``ReadbackError``,
whose ``reason`` is one of ``READBACK_REASONS``. The reader skips the record, and
``Readback.rejected`` counts it (``segment_readback_rejected_total{source,reason}``, at every read)
and logs it once.

Times read back are bounded like input event times (``InputContract.time_range``): never later
than now + ``SEG_MAX_EVENT_SKEW_S`` (a change dated 9999 would make every later event of its
customer late), never outside years 1..9999. Not by ``SEG_MAX_EVENT_AGE_S``: a compacted topic
keeps a customer's last record for as long as the customer is known.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Generic, Protocol, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from segmentation.bundle import MAX_NAME_CHARS, SEGMENT_ID_LIMIT, ModelBundle
from segmentation.domain import ReadbackReason, ReadbackSource
from segmentation.events import EPOCH_MS_MIN, InputContract
from segmentation.settings import Settings

log = logging.getLogger(__name__)

# The largest version, offset or counter read back: a double holds it exactly (Redis's Lua does
# its arithmetic in doubles), so Python and the scripts agree on every accepted value.
MAX_VERSION = 2**53 - 1
DEFAULT_SKEW_S: float = Settings.model_fields["max_event_skew_s"].default
DEFAULT_MAX_BUNDLE_BYTES: int = Settings.model_fields["max_bundle_bytes"].default

M = TypeVar("M", bound=BaseModel)
K = TypeVar("K")
V = TypeVar("V")


class ReadbackError(ValueError):
    """A record read back that is refused: ``reason`` (one of ``READBACK_REASONS``) for machines,
    ``detail`` for humans (never the record's content)."""

    def __init__(self, reason: ReadbackReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: ReadbackReason = reason
        self.detail = detail


@dataclass(frozen=True)
class Limits:
    """How many bytes a record kind may have, and how deeply its arrays and objects may nest."""

    max_bytes: int
    max_depth: int


NUMBER = Limits(20, 0)  # a Redis pointer or counter: decimal digits
POINTER = Limits(1024, 2)  # {"version": N}; {"version": N, "next_segment_id": M}
CHANGE = Limits(1 << 20, 3)  # a change record: the ids of an input message (SEG_MAX_MESSAGE_BYTES
#                             is at most 900,000) and its own fields
RUN = Limits(262_144, 4)  # a run-log entry (failures: a list of objects)
REPLICA = Limits(16 << 20, 4)  # a replica state: online centroids of up to 256 x 2048 numbers
MAX_KEY_CHARS = 64  # a models-topic key: current, pinned, challenger, reserved or v<N>

# --- bytes, before any parser ----------------------------------------------------------------
_ESCAPE = re.compile(rb"\\.", re.DOTALL)
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'"[]{}')
_OPENERS = np.frombuffer(b"[{", dtype=np.uint8)
_CHUNK = 1 << 20


def nesting_depth(data: bytes) -> int:
    """How deeply the JSON arrays and objects of ``data`` nest, brackets inside strings left out.
    Read on the bytes without parsing them: linear time, memory bounded by a chunk.

    >>> nesting_depth(b'{"a": [1, {"b": "[[[["}]}'), nesting_depth(b"[" * 50_000), nesting_depth(b"7")
    (3, 50000, 0)
    """
    kept = _ESCAPE.sub(b"", data).translate(None, _NOT_STRUCTURE)
    brackets = b"".join(kept.split(b'"')[::2])  # even pieces lie outside strings
    deepest = level = floor = 0  # a closer with nothing open lowers the floor, not the depth
    for start in range(0, len(brackets), _CHUNK):
        chunk = np.frombuffer(brackets[start:start + _CHUNK], dtype=np.uint8)
        path = level + np.cumsum(np.where(np.isin(chunk, _OPENERS), 1, -1), dtype=np.int64)
        floors = np.minimum(np.minimum.accumulate(path), floor)
        deepest = max(deepest, int((path - floors).max()))
        level, floor = int(path[-1]), int(floors[-1])
    return deepest


def decode_json(raw: bytes | str | None, limits: Limits) -> Any:
    """``raw`` parsed as JSON, once its size and depth are within ``limits``.

    >>> decode_json(b'{"version": 3}', POINTER)
    {'version': 3}
    >>> [decode_error(lambda r=r: decode_json(r, POINTER)) for r in (b"[" * 500, b"x" * 2000, b"{oops")]
    ['too_deep', 'too_large', 'not_json']
    """
    if raw is None:
        raise ReadbackError("not_json", "no value")
    data = raw.encode("utf-8", "replace") if isinstance(raw, str) else raw
    if len(data) > limits.max_bytes:
        raise ReadbackError("too_large", f"{len(data)} bytes, more than {limits.max_bytes}")
    # A value cannot nest deeper than it has openers: most records are cleared by two counts,
    # and only one with more openers than the limit is scanned (three quarters of a change
    # record's decode time went to the scan).
    openers = data.count(b"[") + data.count(b"{")
    depth = openers if openers <= limits.max_depth else nesting_depth(data)
    if depth > limits.max_depth:
        raise ReadbackError("too_deep", f"nested {depth} deep, more than {limits.max_depth}")
    try:
        # UTF-8 only: json would guess UTF-16 or 32 from the bytes, whose quotes and brackets the
        # depth scan does not see. Safe now: nested no deeper than max_depth.
        return json.loads(data.decode("utf-8"))
    except ValueError as exc:  # not UTF-8, not JSON, an integer of more than 4300 digits
        raise ReadbackError("not_json", str(exc)[:200]) from None


def validated(value: Any, model: type[M]) -> M:
    """``value`` as ``model`` (strict: no string taken for a number, no boolean for an integer)."""
    try:
        return model.model_validate(value, strict=True)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(map(str, first["loc"])) or "the record"
        raise ReadbackError("wrong_type", f"{where}: {first['msg']}") from None


def decode_error(decode: Callable[[], object]) -> str | None:
    """The reason ``decode()`` refuses its record, or None if it accepts it (tests, doctests)."""
    try:
        decode()
    except ReadbackError as exc:
        return exc.reason
    return None


# --- keys and numbers ------------------------------------------------------------------------
def key_text(key: bytes | str | None, max_chars: int) -> str:
    """A record's key as text: UTF-8, 1..``max_chars`` characters; else ``bad_key``.

    >>> key_text(b"c-1", 8), [decode_error(lambda k=k: key_text(k, 8)) for k in (b"\\xff", None, "c" * 9)]
    ('c-1', ['bad_key', 'bad_key', 'bad_key'])
    """
    if isinstance(key, bytes):
        try:
            key = key.decode("utf-8")
        except UnicodeDecodeError:
            raise ReadbackError("bad_key", "the key is not UTF-8") from None
    if not key or len(key) > max_chars:
        raise ReadbackError("bad_key", f"the key has {len(key or '')} characters, not 1..{max_chars}")
    return key


def _digits(text: str, high: int) -> int | None:
    """``text`` as a number if it is ASCII decimal digits without a leading zero and at most
    ``high``; else None (``str.isdigit`` would take '²' and '١', which ``int`` refuses or reads)."""
    if not (0 < len(text) <= 16 and text.isascii() and text.isdigit()):
        return None
    if len(text) > 1 and text[0] == "0":
        return None
    number = int(text)
    return number if number <= high else None


def version_key(name: str) -> int:
    """The version of a models-topic key ``v<N>`` (N >= 1, decimal ASCII); else ``bad_key``.

    >>> version_key("v12")
    12
    >>> [decode_error(lambda k=k: version_key(k)) for k in ("v²", "v-1", "v", "v1e3", "", "v01", "v0")]
    ['bad_key', 'bad_key', 'bad_key', 'bad_key', 'bad_key', 'bad_key', 'bad_key']
    """
    version = _digits(name[1:], MAX_VERSION) if name.startswith("v") else None
    if not version:
        raise ReadbackError("bad_key", f"{name[:40]!r} is not v<version>")
    return version


def decode_number(raw: bytes | str | None, low: int = 0, high: int = MAX_VERSION) -> int:
    """A Redis pointer or counter (a version, an offset, a sequence): decimal ASCII digits in
    ``[low, high]``; else ``too_large`` or ``wrong_type``.

    >>> decode_number(b"42"), [decode_error(lambda r=r: decode_number(r, 1)) for r in ("²", "0", "1" * 21)]
    (42, ['wrong_type', 'wrong_type', 'too_large'])
    """
    if raw is None:
        raise ReadbackError("wrong_type", "no value")
    data = raw.encode("utf-8", "replace") if isinstance(raw, str) else raw
    if len(data) > NUMBER.max_bytes:
        raise ReadbackError("too_large", f"{len(data)} bytes, more than {NUMBER.max_bytes}")
    number = _digits(data.decode("ascii", "replace"), high)
    if number is None or number < low:
        raise ReadbackError("wrong_type", f"not a number in [{low}, {high}]")
    return number


# --- times -----------------------------------------------------------------------------------
def check_time(ms: float, latest_ms: float, what: str) -> None:
    """``bad_time`` unless ``ms`` (epoch ms) is finite, in year 1 or later, and not after
    ``latest_ms``."""
    if not (math.isfinite(ms) and EPOCH_MS_MIN <= ms <= latest_ms):
        raise ReadbackError("bad_time", f"{what} is not between year 1 and now + the allowed skew")


def iso_time_ms(text: str, latest_ms: float) -> int:
    """An RFC 3339 time with its zone (ours always say Z) as epoch ms, bounded; else ``bad_time``.

    >>> iso_time_ms("1970-01-01T00:00:01.000Z", latest_ms=1e12)
    1000
    >>> future, naive = "9999-12-31T00:00:00Z", "1970-01-01T00:00:01"
    >>> [decode_error(lambda t=t: iso_time_ms(t, 1e12)) for t in (future, naive, "x")]
    ['bad_time', 'bad_time', 'bad_time']
    """
    try:
        when = datetime.fromisoformat(text)
        if when.tzinfo is None:
            raise ValueError("no zone")
        ms = int(when.timestamp() * 1000)
    except (ValueError, OverflowError, OSError):
        raise ReadbackError("bad_time", "event_time is not an RFC 3339 time with its zone") from None
    check_time(ms, latest_ms, "event_time")
    return ms


# --- record kinds ----------------------------------------------------------------------------
Version = Annotated[int, Field(ge=1, le=MAX_VERSION)]
Count = Annotated[int, Field(ge=0, le=MAX_VERSION)]
SegmentId = Annotated[int, Field(ge=0, lt=SEGMENT_ID_LIMIT)]
_STRICT = ConfigDict(strict=True, extra="ignore", frozen=True)
_OPEN = ConfigDict(strict=True, extra="allow", frozen=True)  # fields added later survive


class VersionPointer(BaseModel):
    """``current`` or ``pinned`` on the models topic: ``{"version": N}`` (``null``: unpinned)."""

    model_config = _STRICT
    version: Version | None


class Reserved(BaseModel):
    """``reserved`` on the models topic: the counters when the challenger slot last changed."""

    model_config = _STRICT
    version: Count
    next_segment_id: int = Field(ge=0, le=SEGMENT_ID_LIMIT)


class ChangeRecord(BaseModel):
    """What a change record leaves its customer in (its other fields are not read back)."""

    model_config = _STRICT
    to_segment_id: SegmentId
    to_segment: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    to_model_version: Version
    event_time: str = Field(max_length=64)


@dataclass(frozen=True, slots=True)
class Change:
    """A decoded change record: the customer's segment, its model and the event's time."""

    segment_id: int
    segment: str
    model_version: int
    event_ms: int


class ReplicaState(BaseModel):
    """``P:online:<replica>``: the fields the trainer and the CLI read, typed; the rest is kept."""

    model_config = _OPEN
    model_version: Version
    at: float | None = None
    replica: str | None = None
    events_seen: Count | None = None
    online_centroids: list[list[float]] | None = None
    counts: list[float] | None = None
    segment_ids: list[SegmentId] | None = None
    silhouette_simplified: float | None = None
    silhouette_sampled: float | None = None
    silhouette_drift: float | None = None
    novelty_share: float | None = None
    challenger: dict[str, Any] | None = None


class RunFailure(BaseModel):
    model_config = _OPEN
    check: str = Field(min_length=1, max_length=64)
    value: float | None = None
    limit: float | None = None
    detail: str = ""


class RunEntry(BaseModel):
    """An entry of the run log ``P:runs`` as `show`, `history` and `report` print it."""

    model_config = _OPEN
    at: float
    result: str = Field(min_length=1, max_length=64)
    detail: str = ""
    version: Version | None = None
    forced: bool = False
    failures: list[RunFailure] = Field(default_factory=list, max_length=64)


def decode_pointer(raw: bytes) -> int | None:
    """``{"version": N}`` -> N (``{"version": null}`` -> None).

    >>> decode_pointer(b'{"version": 7}'), decode_error(lambda: decode_pointer(b'{"version": true}'))
    (7, 'wrong_type')
    """
    return validated(decode_json(raw, POINTER), VersionPointer).version


def decode_reserved(raw: bytes) -> tuple[int, int]:
    """``{"version": N, "next_segment_id": M}`` -> (N, M).

    >>> decode_reserved(b'{"version": 7, "next_segment_id": 12}')
    (7, 12)
    """
    reserved = validated(decode_json(raw, POINTER), Reserved)
    return reserved.version, reserved.next_segment_id


def check_bundle_size(size: int, max_bytes: int) -> None:
    """``too_large`` if a bundle of ``size`` bytes is over ``max_bytes`` (``SEG_MAX_BUNDLE_BYTES``):
    checked on the length alone (a Redis ``STRLEN``, a record's size), before anything is parsed.

    >>> check_bundle_size(6_000, 1_000_000), decode_error(lambda: check_bundle_size(49 << 20, 1_000_000))
    (None, 'too_large')
    """
    if size > max_bytes:
        raise ReadbackError("too_large", f"bundle of {size} bytes, more than {max_bytes} "
                                         "(SEG_MAX_BUNDLE_BYTES)")


def decode_bundle(raw: bytes, max_bytes: int = DEFAULT_MAX_BUNDLE_BYTES) -> ModelBundle:
    """A bundle of at most ``max_bytes``, validated (its parser bounds its depth itself);
    ``too_large``, ``not_json``, ``too_deep`` or ``wrong_type`` saying why not."""
    check_bundle_size(len(raw), max_bytes)
    try:
        return ModelBundle.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(map(str, first["loc"])) or "the bundle"
        reason: ReadbackReason = "wrong_type"
        if first["type"] == "json_invalid":
            reason = "too_deep" if "recursion limit" in str(first["msg"]) else "not_json"
        raise ReadbackError(reason, f"invalid bundle: {where}: {first['msg']}") from None


def decode_change(raw: bytes | str | None, latest_ms: float) -> Change:
    """A record of the changes topic (a tombstone is ``not_json``).

    >>> decode_change(b'{"to_segment_id":3,"to_segment":"x","to_model_version":5,'
    ...               b'"event_time":"1970-01-01T00:00:01.000Z"}', latest_ms=1e12)
    Change(segment_id=3, segment='x', model_version=5, event_ms=1000)
    """
    record = validated(decode_json(raw, CHANGE), ChangeRecord)
    return Change(record.to_segment_id, record.to_segment, record.to_model_version,
                  iso_time_ms(record.event_time, latest_ms))


def decode_replica_state(raw: bytes | None, latest_ms: float) -> dict[str, Any]:
    """A replica state, as the replica wrote it.

    >>> decode_replica_state(b'{"model_version": 2, "silhouette_drift": -0.1, "x": 1}', 1e12)
    {'model_version': 2, 'silhouette_drift': -0.1, 'x': 1}
    """
    value = decode_json(raw, REPLICA)
    state = validated(value, ReplicaState)
    if state.at is not None:
        check_time(state.at * 1000, latest_ms, "at")
    return dict(value)


def decode_run(raw: bytes | None, latest_ms: float) -> dict[str, Any]:
    """A run-log entry, with every field `show`, `history` and `report` read present.

    >>> decode_run(b'{"at": 1.5, "result": "skipped"}', 1e12)["failures"]
    []
    >>> decode_error(lambda: decode_run(b'{"at": 1e300, "result": "skipped"}', 1e12))
    'bad_time'
    """
    entry = validated(decode_json(raw, RUN), RunEntry)
    check_time(entry.at * 1000, latest_ms, "at")
    return entry.model_dump()


# --- where refusals go -----------------------------------------------------------------------
class RejectionCounter(Protocol):
    """``segment_readback_rejected_total`` (``segmentation.metrics.readback_rejected``)."""

    def labels(self, source: str, reason: str) -> Any: ...


class Recent(Generic[K, V]):
    """A mapping that keeps only its ``size`` most recently used keys (the least recent is
    forgotten first): a memory of what was seen that does not grow with what is seen.

    >>> seen = Recent[int, str](2)
    >>> seen[1], seen[2] = "a", "b"
    >>> _ = seen.get(1); seen[3] = "c"  # 1 was used after 2: 2 is forgotten
    >>> sorted(seen.keys()), 2 in seen, len(seen)
    ([1, 3], False, 2)
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[K, V] = OrderedDict()

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def __setitem__(self, key: K, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def get(self, key: K, default: V | None = None) -> V | None:
        """The value of ``key`` (now the most recently used), or ``default``."""
        if key not in self._items:
            return default
        self._items.move_to_end(key)
        return self._items[key]

    def keys(self) -> list[K]:
        return list(self._items)


class ReadbackSettings(Protocol):
    """What reading records back is bounded by (``Settings`` provides it)."""

    @property
    def max_event_skew_s(self) -> float: ...
    @property
    def max_bundle_bytes(self) -> int: ...


class Readback:
    """How one process reads records back: the latest time a record may carry (the input
    contract's skew), the largest bundle it parses (``max_bundle_bytes``), and where refusals go:
    counted at every read that meets them, logged once per record (a bounded memory of those
    already reported, the least recent forgotten first)."""

    def __init__(self, counter: RejectionCounter | None = None, max_skew_s: float | None = DEFAULT_SKEW_S,
                 remember: int = 4096, max_bundle_bytes: int = DEFAULT_MAX_BUNDLE_BYTES) -> None:
        self.counter = counter
        self.contract = InputContract((), max_skew_s=max_skew_s)
        self.max_bundle_bytes = max_bundle_bytes
        self._reported: Recent[tuple[str, str, str], None] = Recent(remember)
        self._lock = threading.Lock()

    @classmethod
    def of(cls, settings: ReadbackSettings, counter: RejectionCounter | None = None) -> Readback:
        return cls(counter, settings.max_event_skew_s, max_bundle_bytes=settings.max_bundle_bytes)

    def bundle(self, raw: bytes) -> ModelBundle:
        """``decode_bundle`` within this process's ``max_bundle_bytes``."""
        return decode_bundle(raw, self.max_bundle_bytes)

    def latest_ms(self, now_ms: int | None = None) -> float:
        """The latest time (epoch ms) a record read back at ``now_ms`` may carry."""
        now = int(time.time() * 1000) if now_ms is None else now_ms
        return self.contract.time_range(now)[1]

    def rejected(self, source: ReadbackSource, record: str, error: ReadbackError) -> None:
        """Count a refused record; log it the first time (``record`` names it: a key, an offset)."""
        if self.counter is not None:
            self.counter.labels(source, error.reason).inc()
        if self._first_report((source, record, error.reason)):
            log.error("record read back refused and skipped", extra={
                "source": source, "record": record[:120], "reason": error.reason,
                "detail": error.detail[:200]})

    def _first_report(self, key: tuple[str, str, str]) -> bool:
        with self._lock:
            first = key not in self._reported
            self._reported[key] = None
            return first


def redis_record(key: str | bytes, raw: bytes | str | None) -> str:
    """How a Redis value is named in logs: its key, and a hash of its content (so that another
    bad value under the same key is reported again)."""
    name = key.decode("utf-8", "replace") if isinstance(key, bytes) else key
    return f"{name[:100]!r}#{hash(raw) & 0xFFFFFFFF:08x}"
