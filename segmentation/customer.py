"""A customer's latest assignment, as the consumer makes it and Redis keeps it (pure: no I/O)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CustomerAssignment:
    """A customer's segment after one event (``event_ms``, at input ``offset``): an older one
    never overwrites a newer one in the customer store."""

    customer_id: str
    event_ms: int
    offset: int
    segment_id: int
    segment: str
    model_version: int
    event_id: str
