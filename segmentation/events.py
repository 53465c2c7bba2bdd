"""The input contract: a customer event on ``customer-events``, and the decision to dead-letter it.

``decode`` never raises on bad input: it returns either a ``CustomerEvent`` or a ``Rejection``
whose ``reason`` is one of ``REASONS`` and whose ``detail`` tells a human what was wrong.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StrictFloat, StrictInt, ValidationError

REASONS = (
    "not_json",  # the value is not JSON (or not UTF-8)
    "not_object",  # JSON, but not an object
    "missing_field",  # customer_id, event_time or features absent
    "wrong_type",  # a field or feature has the wrong type (a string where a number is expected)
    "bad_event_time",  # event_time neither RFC 3339 with offset nor epoch milliseconds
    "missing_feature",  # a feature the model uses is absent
    "non_finite",  # NaN or +/-Infinity in a feature the model uses
    "out_of_range",  # a feature outside its configured bounds (absurd values poison the scaler)
)


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

    customer_id: str = Field(min_length=1, description="Kafka key as well (UTF-8)")
    event_time: AwareDatetime | StrictInt = Field(
        description="RFC 3339 with offset, or epoch milliseconds"
    )
    event_id: str | None = Field(None, description="optional; echoed in the output")
    features: dict[str, StrictInt | StrictFloat] = Field(
        description="numeric behavioural features; which ones are used is configuration"
    )
    attributes: dict[str, str] = Field(
        default_factory=dict, description="categorical attributes, e.g. channel"
    )

    @property
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


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a message cannot be scored: a reason code for machines, a detail for humans."""

    reason: str
    detail: str


def decode(
    value: bytes | None,
    features: tuple[str, ...],
    bounds: Mapping[str, tuple[float, float]] | None = None,
) -> CustomerEvent | Rejection:
    """Parse and validate one message value against the configured feature set.

    >>> decode(b'{"customer_id":"c","event_time":1,"features":{"x":1.5}}', ("x",)).features
    {'x': 1.5}
    >>> decode(b"garbage", ("x",)).reason
    'not_json'
    >>> decode(b'{"customer_id":"c","event_time":1,"features":{}}', ("x",))
    Rejection(reason='missing_feature', detail='features.x is required')
    >>> decode(b'{"customer_id":"c","event_time":1,"features":{"x":"7"}}', ("x",)).reason
    'wrong_type'
    >>> decode(b'{"customer_id":"c","event_time":1,"features":{"x":NaN}}', ("x",))
    Rejection(reason='non_finite', detail='features.x is nan')
    >>> decode(b'{"customer_id":"c","event_time":1,"features":{"x":1e308}}', ("x",), {"x": (0, 1e9)})
    Rejection(reason='out_of_range', detail='features.x is 1e+308, outside [0, 1000000000.0]')
    """
    if value is None:
        return Rejection("not_json", "message has no value (tombstone)")
    try:
        event = CustomerEvent.model_validate_json(value)
    except ValidationError as exc:
        return _rejection_from(exc)
    for name in features:
        number = event.features.get(name)
        if number is None:
            return Rejection("missing_feature", f"features.{name} is required")
        if not math.isfinite(number):
            return Rejection("non_finite", f"features.{name} is {number}")
        if bounds is not None and name in bounds:
            low, high = bounds[name]
            if not low <= number <= high:
                return Rejection("out_of_range", f"features.{name} is {number}, outside [{low}, {high}]")
    return event


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
    return schema


if __name__ == "__main__":  # python -m segmentation.events > segmentation/event.schema.json
    print(json.dumps(json_schema(), indent=2, sort_keys=True))
