"""The input contract: a customer event on ``customer-events``, and the decision to dead-letter it.

``decode`` never raises on bad input: it returns either a ``DecodedEvent`` or a ``Rejection``
whose ``reason`` is one of ``REASONS`` and whose ``detail`` tells a human what was wrong.

``CustomerEvent`` (pydantic) is the contract: its JSON Schema is what producers validate against,
and it is the exact validator whose errors become the rejection reasons. ``DecodedEvent`` (a
msgspec struct) is what decoding hands on; a batch is decoded with msgspec first, about five
times cheaper per message than pydantic, and any message that fast path is not sure of goes
through ``CustomerEvent``. Code that reads events takes the ``Event`` protocol, which both meet.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache, cached_property
from operator import itemgetter
from typing import Annotated, Any, Protocol

import msgspec
import numpy as np
from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    ValidationError,
    WithJsonSchema,
)
from pydantic_core import PydanticCustomError

# Why a message is dead-lettered (its ``dlq.reason`` header), and what each reason means.
REASON_MEANINGS: dict[str, str] = {
    "not_json": "the value is not JSON (or not UTF-8)",
    "not_object": "JSON, but not an object",
    "missing_field": "customer_id, event_time or features absent",
    "wrong_type": "a field or feature has the wrong type (a string where a number is expected)",
    "bad_event_time": "event_time neither an RFC 3339 string with its offset nor a whole number of ms",
    "key_mismatch": "the Kafka key is missing or is not the customer_id (UTF-8); SEG_REQUIRE_KEY_MATCH",
    "missing_feature": "a feature the model uses is absent",
    "non_finite": "NaN or +/-Infinity in a feature the model uses",
    "out_of_range": "a feature outside its configured bounds (absurd values poison the scaler)",
    "too_large": "the message (key + value) is over SEG_MAX_MESSAGE_BYTES",
    "too_long": "an id, attribute key or value over its length limit, or too many fields",
    "event_time_out_of_range": "event_time older than SEG_MAX_EVENT_AGE_S or too far ahead",
    "internal_error": "scoring this one message raised (a bug here); the exception class is in dlq.error",
    "output_rejected": "the broker refused this message's output record for good; its error is in dlq.error",
}
REASONS = tuple(REASON_MEANINGS)

# RFC 3339 section 5.6 ``date-time``: the offset is required. ASCII digits only (Python's ``\d``
# would take any Unicode digit, the schema's ECMA-262 ``\d`` does not); the schema carries it too.
RFC3339_PATTERN = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})$"
)
_RFC3339 = re.compile(RFC3339_PATTERN)


def one_unit_per_json_type(value: object) -> object:
    """``event_time`` before it is parsed: a JSON number is epoch milliseconds whether it is
    written as an integer or a float (as JSON Schema says, ``1.7e12`` *is* an integer), so a whole
    float becomes that integer; a string must be an RFC 3339 date-time with its offset. A
    fractional or non-finite number and a numeric string are refused: the same number must never
    be read in two units.

    >>> one_unit_per_json_type(1764410100000.0), one_unit_per_json_type(1764410100000)
    (1764410100000, 1764410100000)
    >>> one_unit_per_json_type("2025-11-29T10:15:00Z")
    '2025-11-29T10:15:00Z'
    >>> for bad in (1764410100000.5, float("nan"), "1764410100", "2025-11-29T10:15Z"):
    ...     try:
    ...         one_unit_per_json_type(bad)
    ...     except PydanticCustomError as exc:
    ...         print(exc.type)
    fractional_ms
    fractional_ms
    not_rfc3339
    not_rfc3339
    """
    if isinstance(value, float):
        if not value.is_integer():
            raise PydanticCustomError(
                "fractional_ms", "a number is epoch milliseconds and must be a whole number"
            )
        return int(value)
    if isinstance(value, str) and not _RFC3339.fullmatch(value):
        raise PydanticCustomError(
            "not_rfc3339",
            "a string must be an RFC 3339 date-time with its offset, e.g. 2026-11-29T10:15:00Z"
            " (epoch milliseconds are a JSON number, never a string)",
        )
    return value


Rfc3339 = Annotated[
    AwareDatetime, WithJsonSchema({"type": "string", "format": "date-time", "pattern": RFC3339_PATTERN})
]
EventTime = Annotated[Rfc3339 | StrictInt, BeforeValidator(one_unit_per_json_type)]


class CustomerEvent(BaseModel):
    """One customer's current behavioural features. Extra fields are ignored."""

    model_config = ConfigDict(
        extra="ignore",
        frozen=True,
        json_schema_extra={
            "examples": [
                {
                    "customer_id": "c-1042",
                    "event_time": "2026-11-29T10:15:00Z",
                    "event_id": "e-88231",
                    "features": {
                        "recency_days": 3,
                        "frequency_90d": 14,
                        "monetary_90d": 812.5,
                        "avg_basket_value": 58.0,
                        "sessions_30d": 22,
                        "tenure_days": 730,
                    },
                    "attributes": {"channel": "app"},
                }
            ]
        },
    )

    customer_id: str = Field(
        min_length=1, description="the Kafka key as well (UTF-8); else dead-lettered (key_mismatch)"
    )
    event_time: EventTime = Field(
        description="an RFC 3339 date-time string with its offset, or a JSON number of epoch"
        " milliseconds (1764410100000 and 1764410100000.0 alike); a numeric string is refused"
    )
    event_id: str | None = Field(None, description="optional; echoed in the output")
    features: dict[str, StrictInt | StrictFloat] = Field(
        description="numeric behavioural features; which ones are used is configuration"
    )
    attributes: dict[str, str] = Field(
        default_factory=dict, description="categorical attributes, e.g. channel"
    )

    @cached_property
    def event_ms(self) -> int:
        """Event time in epoch milliseconds.

        >>> CustomerEvent(customer_id="c", event_time=1700000000000, features={}).event_ms
        1700000000000
        >>> CustomerEvent(customer_id="c", event_time="1970-01-01T00:00:01Z", features={}).event_ms
        1000
        """
        if isinstance(self.event_time, int):
            return self.event_time
        return int(self.event_time.timestamp() * 1000)


class Event(Protocol):
    """What is read of an event once it is decoded (a ``DecodedEvent``, or a ``CustomerEvent``)."""

    @property
    def customer_id(self) -> str: ...
    @property
    def event_id(self) -> str | None: ...
    @property
    def event_ms(self) -> int: ...
    @property
    def features(self) -> dict[str, int | float]: ...
    @property
    def attributes(self) -> dict[str, str]: ...


class DecodedEvent(msgspec.Struct, frozen=True):
    """An accepted event: ``CustomerEvent``'s fields with the event time in epoch ms.

    >>> wire = CustomerEvent(customer_id="c", event_time="1970-01-01T00:00:01Z", features={"x": 1})
    >>> e = DecodedEvent.of(wire)
    >>> e.event_ms, e.features, e.attributes, e.event_id
    (1000, {'x': 1}, {}, None)
    """

    customer_id: str
    event_ms: int
    features: dict[str, int | float]
    attributes: dict[str, str] = {}
    event_id: str | None = None

    @classmethod
    def of(cls, event: Event) -> DecodedEvent:
        return cls(event.customer_id, event.event_ms, event.features, event.attributes, event.event_id)


class _Wire(msgspec.Struct):
    """The fast path's view of a message (the lengths are the contract's, see ``_wire_decoder``)."""

    customer_id: str
    event_time: int | str
    features: dict[str, int | float]
    event_id: str | None = None
    attributes: dict[str, str] = {}


@cache
def _wire_decoder(max_id_chars: int, max_attribute_chars: int, max_fields: int) -> msgspec.json.Decoder[Any]:
    """A msgspec decoder that accepts only what fits the contract's lengths (checked in C)."""
    ident = Annotated[str, msgspec.Meta(max_length=max_id_chars)]
    text = Annotated[str, msgspec.Meta(max_length=max_attribute_chars)]
    wire = msgspec.defstruct("Wire", [
        ("customer_id", Annotated[str, msgspec.Meta(min_length=1, max_length=max_id_chars)]),
        ("event_time", int | str),
        ("features", Annotated[dict[str, int | float], msgspec.Meta(max_length=max_fields)]),
        ("event_id", ident | None, None),
        ("attributes", Annotated[dict[text, text], msgspec.Meta(max_length=max_fields)], {}),
    ])
    return msgspec.json.Decoder(wire)


# The RFC 3339 strings the fast path converts itself: seconds, at most microseconds, an offset.
# Anything else a producer may send (more digits, a lower-case ``t``) goes to the exact path.
_PLAIN_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?(Z|[+-][0-9]{2}:[0-9]{2})"
)


def plain_event_ms(event_time: int | str) -> int | None:
    """Epoch ms of an ``event_time`` the fast path is sure of, else ``None``: ``CustomerEvent``
    decides (a string outside the plain form, a date Python refuses).

    >>> plain_event_ms(1000), plain_event_ms("1970-01-01T00:00:01.5+00:00")
    (1000, 1500)
    >>> plain_event_ms("1970-01-01t00:00:01Z"), plain_event_ms("1970-01-01T00:00:01.1234567Z")
    (None, None)
    """
    if isinstance(event_time, int):
        return event_time
    if not _PLAIN_RFC3339.fullmatch(event_time):
        return None
    try:
        return int(datetime.fromisoformat(event_time).timestamp() * 1000)
    except (ValueError, OverflowError, OSError):
        return None


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a message cannot be scored: a reason code for machines, a detail for humans."""

    reason: str
    detail: str


class KafkaMessage(Protocol):
    """What decoding needs of a consumed message (a confluent_kafka.Message, or a test's own)."""

    def key(self) -> str | bytes | None: ...
    def value(self) -> str | bytes | None: ...
    def headers(
        self,
    ) -> dict[str, str | bytes | None] | Sequence[tuple[str, str | bytes | None]] | None: ...


def _as_bytes(v: str | bytes | None) -> bytes | None:
    return v.encode() if isinstance(v, str) else v


def _header_bytes(msg: KafkaMessage) -> int:
    headers = msg.headers()
    if not headers:
        return 0
    items = headers.items() if isinstance(headers, dict) else headers
    return sum(len(name) + len(_as_bytes(v) or b"") for name, v in items)


_JOINED_BYTES = 4096  # values up to this size are scanned for escapes as one string per batch


@dataclass(frozen=True, slots=True)
class InputContract:
    """The bounds of the input contract: what a message may be before it is scored or trained on.

    Every field has a limit so that no single message, however absurd, can make an output or a
    dead letter too large for the broker, overflow a conversion, or freeze a customer's state.
    ``max_age_s`` / ``max_skew_s`` of ``None`` leave ``event_time`` unbounded (doctests, tools).

    ``require_key_match``: a message's Kafka key must be its ``customer_id`` (UTF-8), else it is
    a ``key_mismatch`` dead letter. The key picks the partition, and the partition holds the
    customer's state, so one customer under two keys would be two customers. The settings turn it
    on (``SEG_REQUIRE_KEY_MATCH``); off here, for decoding a value without its message.
    """

    features: tuple[str, ...]
    bounds: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    max_message_bytes: int = 65_536
    max_id_chars: int = 256
    max_attribute_chars: int = 256
    max_fields: int = 256
    max_age_s: float | None = None
    max_skew_s: float | None = None
    require_key_match: bool = False

    def decode_message(self, msg: KafkaMessage, now_ms: int | None = None) -> DecodedEvent | Rejection:
        """``decode`` of a consumed message: its key and headers count towards its size."""
        return self.decode(_as_bytes(msg.value()), _as_bytes(msg.key()), now_ms, _header_bytes(msg))

    def decode_batch(
        self, messages: Sequence[KafkaMessage], now_ms: int | None = None
    ) -> list[DecodedEvent | Rejection]:
        """``decode_message`` of every message, the common case checked per batch.

        A fast path only *accepts*: a message it is not sure of (any check that fails, a number
        too large to compare exactly as a float) goes through ``decode_message``, which gives the
        exact event or rejection. So the batch decodes exactly as message by message.

        >>> class M:
        ...     def __init__(self, value): self.v = value
        ...     def key(self): return b"c"
        ...     def value(self): return self.v
        ...     def headers(self): return None
        >>> c = InputContract(("x",), {"x": (0, 10)})
        >>> ok, bad = b'{"customer_id":"c","event_time":1,"features":{"x":1}}', b'{"customer_id":"c"}'
        >>> batch = [M(ok), M(bad), M(ok.replace(b"1}", b"99}"))]
        >>> [getattr(d, "reason", "event") for d in c.decode_batch(batch)]
        ['event', 'missing_field', 'out_of_range']
        """
        now = now_ms if now_ms is not None else int(time.time() * 1000)
        decoder = _wire_decoder(self.max_id_chars, self.max_attribute_chars, self.max_fields)
        values = [m.value() for m in messages]
        # one scan of the batch's usual-sized values: none has a \u escape unless their
        # concatenation has one (a larger value is scanned on its own, so the copy stays small)
        small = (v for v in values if isinstance(v, bytes) and len(v) <= _JOINED_BYTES)
        escapes = b"\\u" in b"".join(small)
        parsed = {i: e for i, (m, v) in enumerate(zip(messages, values, strict=True))
                  if (e := self._parse(m, v, decoder, escapes)) is not None}
        positions = list(parsed)
        events = list(parsed.values())
        for j in set(self._times_in_doubt(events, now)) | set(self._features_in_doubt(events)):
            del parsed[positions[j]]
        return [parsed[i] if i in parsed else self.decode_message(m, now) for i, m in enumerate(messages)]

    def _parse(self, msg: KafkaMessage, value: str | bytes | None, decoder: msgspec.json.Decoder[Any],
               escapes: bool) -> DecodedEvent | None:
        """The event of ``msg`` (whose value is ``value``) when its size, its JSON, its ids and
        attributes and its key pass, decoded by msgspec; ``None``: in doubt. A value with a
        ``\\u`` escape is in doubt (msgspec takes a lone surrogate that the exact path refuses):
        ``escapes`` says whether the batch may hold one."""
        key = _as_bytes(msg.key())
        if not isinstance(value, bytes) or ((escapes or len(value) > _JOINED_BYTES) and b"\\u" in value):
            return None
        if len(value) + (len(key) if key else 0) + _header_bytes(msg) > self.max_message_bytes:
            return None
        try:
            wire = decoder.decode(value)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return None
        ms = plain_event_ms(wire.event_time)
        if ms is None:
            return None
        event = DecodedEvent(wire.customer_id, ms, wire.features, wire.attributes, wire.event_id)
        return event if self._check_key(event, key) is None else None

    def _times_in_doubt(self, events: Sequence[DecodedEvent], now_ms: int) -> list[int]:
        """Positions of the events whose ``event_time`` may be out of range (all of them when one
        cannot be represented)."""
        if not events:
            return []
        try:
            ms = np.array([e.event_ms for e in events], dtype=np.int64)
        except (OverflowError, ValueError, OSError):
            return list(range(len(events)))
        low, high = self.time_range(now_ms)
        # int64 to float is exact inside the accepted range (|ms| < 2**53), so is the comparison
        return np.flatnonzero((ms < low) | (ms > high)).tolist()

    def time_range(self, now_ms: int) -> tuple[float, float]:
        """The event times (epoch ms, both ends included) the contract accepts at ``now_ms``.

        >>> InputContract((), max_skew_s=1).time_range(0)
        (-62135596800000.0, 1000.0)
        """
        low, high = float(EPOCH_MS_MIN), float(EPOCH_MS_MAX)
        if self.max_age_s is not None:
            low = max(low, float(now_ms - self.max_age_s * 1000))
        if self.max_skew_s is not None:
            high = min(high, float(now_ms + self.max_skew_s * 1000))
        return low, high

    def _features_in_doubt(self, events: Sequence[DecodedEvent]) -> list[int]:
        """Positions of the events whose features may fail a check (all of them when the batch
        cannot be put in one float matrix, e.g. a missing feature or a huge integer)."""
        if not events:
            return []
        try:
            raw = raw_numeric(events, self.features)
        except (KeyError, OverflowError, TypeError, ValueError):
            return list(range(len(events)))
        low = np.array([self.bounds.get(n, (-np.inf, np.inf))[0] for n in self.features])
        high = np.array([self.bounds.get(n, (-np.inf, np.inf))[1] for n in self.features])
        # beyond 2**53 a float is not the integer it came from: compare those exactly, one by one
        sure = np.isfinite(raw) & (np.abs(raw) < 2.0**53) & (raw >= low) & (raw <= high)
        return np.flatnonzero(~sure.all(axis=1)).tolist()

    def decode(
        self, value: bytes | None, key: bytes | None = None, now_ms: int | None = None,
        header_bytes: int = 0,
    ) -> DecodedEvent | Rejection:
        """Parse and validate one message; never raises on bad input.

        >>> InputContract(("x",)).decode(b'{"customer_id":"c","event_time":1,"features":{"x":1.5}}').features
        {'x': 1.5}
        >>> InputContract(("x",)).decode(b"garbage").reason
        'not_json'
        >>> InputContract(("x",)).decode(b'{"customer_id":"c","event_time":1,"features":{}}')
        Rejection(reason='missing_feature', detail='features.x is required')
        >>> InputContract(("x",)).decode(b'{"customer_id":"c","event_time":1,"features":{"x":NaN}}')
        Rejection(reason='non_finite', detail='features.x is nan')
        >>> c = InputContract(("x",), max_id_chars=3, max_age_s=60, max_skew_s=60)
        >>> c.decode(b'{"customer_id":"abcd","event_time":0,"features":{"x":1}}', now_ms=0)
        Rejection(reason='too_long', detail='customer_id has 4 characters, more than 3')
        >>> c.decode(b'{"customer_id":"a","event_time":253402300800000,"features":{"x":1}}', now_ms=0).reason
        'event_time_out_of_range'
        >>> c.decode(b'{"customer_id":"a","event_time":0,"features":{"x":1}}', key=b"k" * 70000).reason
        'too_large'
        >>> keyed = InputContract(("x",), require_key_match=True)
        >>> keyed.decode(b'{"customer_id":"a","event_time":0,"features":{"x":1}}', key=b"b")
        Rejection(reason='key_mismatch', detail="the key 'b' is not the customer_id 'a'")
        >>> c.decode(b'{"customer_id":"a","event_time":0,"features":{"x":1%s}}' % (b"0" * 320), now_ms=0)
        Rejection(reason='out_of_range', detail='features.x is an integer of 1064 bits')
        """
        if value is None:
            return Rejection("not_json", "message has no value (tombstone)")
        size = len(value) + (len(key) if key else 0) + header_bytes
        if size > self.max_message_bytes:
            return Rejection("too_large", f"message is {size} bytes, more than {self.max_message_bytes}")
        try:
            event = CustomerEvent.model_validate_json(value)
        except ValidationError as exc:
            return _rejection_from(exc)
        return (
            self._check_sizes(event)
            or self._check_key(event, key)
            or self._check_event_time(event, now_ms)
            or self._check_features(event)
            or DecodedEvent.of(event)
        )

    def _check_sizes(self, event: CustomerEvent) -> Rejection | None:
        for name, text in (("customer_id", event.customer_id), ("event_id", event.event_id or "")):
            if len(text) > self.max_id_chars:
                limit = self.max_id_chars
                return Rejection("too_long", f"{name} has {len(text)} characters, more than {limit}")
        for name, fields in (("features", event.features), ("attributes", event.attributes)):
            if len(fields) > self.max_fields:
                return Rejection("too_long", f"{name} has {len(fields)} entries, more than {self.max_fields}")
        for attribute, text in event.attributes.items():
            longest = max(len(attribute), len(text))
            if longest > self.max_attribute_chars:
                limit = self.max_attribute_chars
                return Rejection(
                    "too_long", f"an attribute key or value has {longest} characters, more than {limit}"
                )
        return None

    def _check_key(self, event: Event, key: bytes | None) -> Rejection | None:
        if not self.require_key_match:
            return None
        return key_mismatch(key, event.customer_id)

    def _check_event_time(self, event: CustomerEvent, now_ms: int | None) -> Rejection | None:
        try:
            ms = event.event_ms
        except (OverflowError, ValueError, OSError):
            return Rejection("event_time_out_of_range", "event_time cannot be represented")
        if not EPOCH_MS_MIN <= ms <= EPOCH_MS_MAX:
            return Rejection("event_time_out_of_range", f"event_time {ms} ms is outside years 1..9999")
        if self.max_age_s is None and self.max_skew_s is None:
            return None
        now = now_ms if now_ms is not None else int(time.time() * 1000)
        if self.max_age_s is not None and ms < now - self.max_age_s * 1000:
            return Rejection(
                "event_time_out_of_range", f"event_time {ms} ms is older than {self.max_age_s:g} s"
            )
        if self.max_skew_s is not None and ms > now + self.max_skew_s * 1000:
            return Rejection(
                "event_time_out_of_range", f"event_time {ms} ms is more than {self.max_skew_s:g} s ahead"
            )
        return None

    def _check_features(self, event: CustomerEvent) -> Rejection | None:
        for name in self.features:
            number = event.features.get(name)
            if number is None:
                return Rejection("missing_feature", f"features.{name} is required")
            if isinstance(number, int) and not -_FLOAT_MAX < number < _FLOAT_MAX:
                # a JSON integer can have any number of digits; float() (and str()) of it would fail
                bits = number.bit_length()
                return Rejection("out_of_range", f"features.{name} is an integer of {bits} bits")
            if not math.isfinite(number):
                return Rejection("non_finite", f"features.{name} is {number}")
            if name in self.bounds:
                low, high = self.bounds[name]
                if not low <= number <= high:
                    detail = f"features.{name} is {number:.6g}, outside [{low:g}, {high:g}]"
                    return Rejection("out_of_range", detail)
        return None


def raw_numeric(events: Sequence[Event], names: Sequence[str]) -> np.ndarray:
    """Numeric features as a float matrix, one row per event, columns in ``names`` order (a
    ``KeyError`` for a missing one).

    >>> e = CustomerEvent(customer_id="c", event_time=0, features={"a": 1, "b": 2.5})
    >>> raw_numeric([e, e], ["b", "a"]).tolist(), raw_numeric([e], ["a"]).tolist()
    ([[2.5, 1.0], [2.5, 1.0]], [[1.0]])
    >>> raw_numeric([], ["a"]).shape
    (0, 1)
    """
    if not names:
        return np.empty((len(events), 0), dtype=np.float64)
    row = itemgetter(*names)  # in C: a tuple of the values (the value itself for one name)
    rows = [row(e.features) for e in events]
    return np.array(rows, dtype=np.float64).reshape(len(events), len(names))


def key_mismatch(key: bytes | None, customer_id: str) -> Rejection | None:
    """A ``key_mismatch`` rejection unless ``key`` is ``customer_id`` in UTF-8.

    >>> key_mismatch(b"c-1", "c-1") is None
    True
    >>> key_mismatch(None, "c-1")
    Rejection(reason='key_mismatch', detail="the message has no key; it must be the customer_id 'c-1'")
    >>> key_mismatch(b"x" * 500, "c-1").detail
    "the key 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx...' (500 bytes) is not the customer_id 'c-1'"
    """
    if key == customer_id.encode("utf-8", "surrogatepass"):
        return None
    wanted = _shown(customer_id)
    if key is None:
        return Rejection("key_mismatch", f"the message has no key; it must be the customer_id {wanted}")
    text = key.decode("utf-8", "replace")
    size = f" ({len(key)} bytes)" if len(text) > _SHOWN_CHARS else ""
    return Rejection("key_mismatch", f"the key {_shown(text)}{size} is not the customer_id {wanted}")


_SHOWN_CHARS = 40


def _shown(text: str) -> str:
    """``text`` quoted for a detail, cut to its first characters.

    >>> _shown("c-1"), _shown("x" * 50)
    ("'c-1'", "'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx...'")
    """
    return repr(text[:_SHOWN_CHARS] + ("..." if len(text) > _SHOWN_CHARS else ""))


_FLOAT_MAX = 10**308
# 0001-01-01 and 9999-12-31T23:59:59.999Z: what an output's RFC 3339 event_time can express
EPOCH_MS_MIN = -62_135_596_800_000
EPOCH_MS_MAX = 253_402_300_799_999


def _rejection_from(exc: ValidationError) -> Rejection:
    errors = exc.errors(include_url=False)
    first = errors[0]
    kind = first["type"]
    loc = ".".join(str(p) for p in first["loc"] if p not in ("int", "float", "datetime"))
    if kind in ("json_invalid", "json_type", "utf8"):
        return Rejection("not_json", str(first["msg"]))
    if kind == "model_type" and not first["loc"]:
        return Rejection("not_object", "the value must be a JSON object")
    if kind == "missing":
        return Rejection("missing_field", f"{loc} is required")
    if first["loc"] and first["loc"][0] == "event_time":
        return Rejection("bad_event_time", f"event_time: {first['msg']}")
    return Rejection("wrong_type", f"{loc}: {first['msg']}")


def event_time_iso(ms: int) -> str:
    """Epoch milliseconds as RFC 3339 UTC.

    >>> event_time_iso(1000)
    '1970-01-01T00:00:01.000Z'
    """
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def json_schema() -> dict[str, Any]:
    """The JSON Schema producers validate against (committed as ``event.schema.json``)."""
    schema = CustomerEvent.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "CustomerEvent"
    _add_default_bounds(schema, InputContract(()))
    return schema


def _add_default_bounds(schema: dict[str, Any], c: InputContract) -> None:
    """The input contract's default bounds, in the schema (deployments may configure others)."""
    props = schema["properties"]
    props["customer_id"]["maxLength"] = c.max_id_chars
    props["event_id"]["anyOf"][0]["maxLength"] = c.max_id_chars
    for name in ("features", "attributes"):
        props[name]["maxProperties"] = c.max_fields
    props["attributes"]["propertyNames"] = {"maxLength": c.max_attribute_chars}
    props["attributes"]["additionalProperties"]["maxLength"] = c.max_attribute_chars
    props["event_time"]["description"] += (
        "; within [now - SEG_MAX_EVENT_AGE_S, now + SEG_MAX_EVENT_SKEW_S] (10 years, 1 hour)"
    )
    schema["description"] += (
        f" The whole message (key + value) is at most {c.max_message_bytes} bytes by default"
        " (SEG_MAX_MESSAGE_BYTES); feature values within the configured feature bounds."
    )


if __name__ == "__main__":  # python -m segmentation.events > segmentation/event.schema.json
    print(json.dumps(json_schema(), indent=2, sort_keys=True))
