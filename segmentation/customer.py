"""A customer's latest assignment, as the consumer makes it and Redis keeps it (pure: no I/O)."""

from __future__ import annotations

import msgspec


class CustomerAssignment(msgspec.Struct, frozen=True):
    """A customer's segment after one event (``event_ms``, at input ``offset``): an older one
    never overwrites a newer one in the customer store. One per scored event, so a msgspec
    struct: a tenth of a frozen dataclass's construction cost."""

    customer_id: str
    event_ms: int
    offset: int
    segment_id: int
    segment: str
    model_version: int
    event_id: str
