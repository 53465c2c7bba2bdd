"""Hostile messages: every kind that must become exactly one dead letter.

Each builder takes a valid event (a dict from ``demo.generator.event_value``, its ``event_id``
already unique) and returns the ``(key, value)`` bytes to produce. The event id is kept at the
start of the value wherever the kind allows it, so an output that should not exist can be traced
back to its kind; the dead letter is traced by its source partition and offset.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

Payload = tuple[bytes | None, bytes | None]
Builder = Callable[[dict[str, Any]], Payload]
Headers = list[tuple[str, bytes]]

# Separates the traceable event id from padding in a hostile event_id (see long_event_id).
ID_SEPARATOR = "|"


def _key(event: dict[str, Any]) -> bytes:
    return str(event["customer_id"]).encode()


def _dumps(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode()


def _with_feature_text(event: dict[str, Any], text: str) -> Payload:
    """``monetary_90d`` replaced by raw JSON number text (what json.dumps cannot write)."""
    marker = 123456789.125
    features = {**event["features"], "monetary_90d": marker}
    value = _dumps({**event, "features": features}).replace(repr(marker).encode(), text.encode())
    return _key(event), value


def _with_event_time(event: dict[str, Any], when: int | str) -> Payload:
    return _key(event), _dumps({**event, "event_time": when})


# --- oversized fields --------------------------------------------------------------------------
def customer_id_500k(event: dict[str, Any]) -> Payload:
    return _key(event), _dumps({**event, "customer_id": "c" * 500_000})


def event_id_300k(event: dict[str, Any]) -> Payload:
    return _key(event), _dumps({**event, "event_id": event["event_id"] + ID_SEPARATOR + "e" * 300_000})


def attribute_key_600k(event: dict[str, Any]) -> Payload:
    return _key(event), _dumps({**event, "attributes": {**event["attributes"], "k" * 600_000: "x"}})


def attribute_value_100k(event: dict[str, Any]) -> Payload:
    return _key(event), _dumps({**event, "attributes": {"channel": "v" * 100_000}})


def attributes_5000(event: dict[str, Any]) -> Payload:
    many = {f"a{i}": "x" for i in range(5000)}
    return _key(event), _dumps({**event, "attributes": {**event["attributes"], **many}})


# --- event_time that passes a naive check but overflows later ------------------------------------
def event_time_int_1e17(event: dict[str, Any]) -> Payload:
    return _with_event_time(event, 10**17)


def event_time_int_2_63(event: dict[str, Any]) -> Payload:
    return _with_event_time(event, 2**63)


def event_time_int_year_10000(event: dict[str, Any]) -> Payload:
    return _with_event_time(event, 253402300800000)


def event_time_int_minus_1e17(event: dict[str, Any]) -> Payload:
    return _with_event_time(event, -(10**17))


def event_time_max_offset(event: dict[str, Any]) -> Payload:
    return _with_event_time(event, "9999-12-31T23:59:59-23:59")


def event_time_min_offset(event: dict[str, Any]) -> Payload:
    return _with_event_time(event, "0001-01-01T00:00:00+23:59")


# --- absurd numbers -----------------------------------------------------------------------------
def feature_int_310_digits(event: dict[str, Any]) -> Payload:
    return _with_feature_text(event, "9" * 310)


def feature_1e308(event: dict[str, Any]) -> Payload:
    return _with_feature_text(event, "1e308")


def feature_minus_1e308(event: dict[str, Any]) -> Payload:
    return _with_feature_text(event, "-1e308")


def feature_1e400(event: dict[str, Any]) -> Payload:
    return _with_feature_text(event, "1e400")


def feature_nan(event: dict[str, Any]) -> Payload:
    return _with_feature_text(event, "NaN")


# --- whole-message hostility --------------------------------------------------------------------
def garbage_999k(event: dict[str, Any]) -> Payload:
    return _key(event), random.Random(event["event_id"]).randbytes(999_000)


def padded_990k(event: dict[str, Any]) -> Payload:
    """Valid by the contract (extra fields are ignored), 990 KB on the wire."""
    small = len(_dumps({**event, "padding": ""}))
    return _key(event), _dumps({**event, "padding": "p" * (990_000 - small)})


def key_900k(event: dict[str, Any]) -> Payload:
    return b"k" * 900_000, _dumps(event)


def nested_100k(event: dict[str, Any]) -> Payload:
    return _key(event), b"[" * 100_000


def empty_value(event: dict[str, Any]) -> Payload:
    return _key(event), b""


def null_value(event: dict[str, Any]) -> Payload:
    """A tombstone: the message has no value at all."""
    return _key(event), None


def invalid_utf8(event: dict[str, Any]) -> Payload:
    return _key(event), _dumps({**event, "customer_id": "@@"}).replace(b"@@", b"c-\xff\xfe\xfd")


def json_array(event: dict[str, Any]) -> Payload:
    return _key(event), b"[" + _dumps(event) + b"]"


def headers_200x4k(event: dict[str, Any]) -> Payload:
    """A valid event; the hostility is in its headers (``HEADERS``)."""
    return _key(event), _dumps(event)


KINDS: dict[str, Builder] = {
    "customer_id_500k": customer_id_500k,
    "event_id_300k": event_id_300k,
    "attribute_key_600k": attribute_key_600k,
    "attribute_value_100k": attribute_value_100k,
    "attributes_5000": attributes_5000,
    "event_time_int_1e17": event_time_int_1e17,
    "event_time_int_2_63": event_time_int_2_63,
    "event_time_int_year_10000": event_time_int_year_10000,
    "event_time_int_minus_1e17": event_time_int_minus_1e17,
    "event_time_max_offset": event_time_max_offset,
    "event_time_min_offset": event_time_min_offset,
    "feature_int_310_digits": feature_int_310_digits,
    "feature_1e308": feature_1e308,
    "feature_minus_1e308": feature_minus_1e308,
    "feature_1e400": feature_1e400,
    "feature_nan": feature_nan,
    "garbage_999k": garbage_999k,
    "padded_990k": padded_990k,
    "key_900k": key_900k,
    "nested_100k": nested_100k,
    "empty_value": empty_value,
    "null_value": null_value,
    "invalid_utf8": invalid_utf8,
    "json_array": json_array,
    "headers_200x4k": headers_200x4k,
}


def headers_for(kind: str) -> Headers:
    """Extra headers of a hostile kind (only ``headers_200x4k`` has any)."""
    if kind == "headers_200x4k":
        return [(f"h{i}", b"x" * 4096) for i in range(200)]
    return []


def build(kind: str, event: dict[str, Any]) -> tuple[bytes | None, bytes | None, Headers]:
    """Key, value and headers of one hostile message of ``kind`` made from a valid ``event``."""
    key, value = KINDS[kind](event)
    return key, value, headers_for(kind)


def traceable_id(event_id: str) -> str:
    """The event id an output is counted under (a hostile 300 KB id is cut at its separator).

    >>> traceable_id("run-h3|eeee")
    'run-h3'
    """
    return event_id.split(ID_SEPARATOR, 1)[0][:200]
