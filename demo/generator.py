"""Synthetic customers in distinct behavioural segments, their events, and malformed messages.

Used by the demo producer (``make run``), the tests and the benchmark, so that all three speak
the input contract exactly as a real producer would.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import numpy as np

FEATURES = ("recency_days", "frequency_90d", "monetary_90d", "avg_basket_value",
            "sessions_30d", "tenure_days")


@dataclass(frozen=True)
class Profile:
    name: str
    means: tuple[float, float, float, float, float, float]  # in FEATURES order
    channels: tuple[tuple[str, float], ...]


PROFILES = (
    Profile("champions", (2, 24, 1800, 75, 32, 900), (("app", 0.7), ("web", 0.3))),
    Profile("loyal regulars", (8, 11, 520, 47, 14, 1500), (("web", 0.6), ("app", 0.4))),
    Profile("new customers", (4, 2, 70, 35, 9, 25), (("web", 0.5), ("app", 0.5))),
    Profile("at risk", (75, 3, 240, 80, 2, 700), (("email", 0.6), ("web", 0.4))),
    Profile("bargain hunters", (12, 8, 130, 16, 24, 350), (("app", 0.5), ("web", 0.5))),
)

MALFORMED_KINDS = ("not_json", "missing_feature", "wrong_type", "non_finite")


@dataclass
class Customer:
    customer_id: str
    segment: int
    centre: np.ndarray  # this customer's own typical features
    channel: str


def another_profile(customer: Customer) -> np.ndarray:
    """The means of a profile other than ``customer``'s (two along), where tests and the chaos
    traffic move a customer to make a true segment change.

    >>> another_profile(Customer("c-0", 0, np.ones(6), "app")).tolist() == list(PROFILES[2].means)
    True
    """
    return np.asarray(PROFILES[(customer.segment + 2) % len(PROFILES)].means, dtype=float)


def make_customers(
    n: int, rng: np.random.Generator, profiles: tuple[Profile, ...] = PROFILES, prefix: str = "c"
) -> list[Customer]:
    """``n`` customers spread evenly over the profiles, each with a personal centre drawn
    around the profile (multiplicative noise, so spend stays positive and skewed)."""
    customers = []
    for i in range(n):
        seg = i % len(profiles)
        p = profiles[seg]
        centre = np.asarray(p.means) * rng.lognormal(0.0, 0.12, size=len(p.means))
        names, weights = zip(*p.channels, strict=True)
        channel = str(rng.choice(names, p=np.asarray(weights) / sum(weights)))
        customers.append(Customer(f"{prefix}-{i}", seg, centre, channel))
    return customers


# Profiles whose customers do not buy: their recency grows with the calendar.
QUIET_PROFILES = ("at risk",)


def calendar_ageing(customer: Customer, days: float) -> np.ndarray:
    """What ``days`` of calendar add to a customer's features: tenure for everyone, recency for
    the quiet ones (a customer who keeps buying keeps a short recency).

    >>> quiet = Customer("c-3", 3, np.ones(6), "web")
    >>> calendar_ageing(quiet, 91.0).tolist()
    [91.0, 0.0, 0.0, 0.0, 0.0, 91.0]
    >>> calendar_ageing(Customer("c-0", 0, np.ones(6), "app"), 91.0).tolist()
    [0.0, 0.0, 0.0, 0.0, 0.0, 91.0]
    """
    added = np.zeros(len(FEATURES))
    added[FEATURES.index("tenure_days")] = days
    if PROFILES[customer.segment].name in QUIET_PROFILES:
        added[FEATURES.index("recency_days")] = days
    return added


def event_value(
    customer: Customer, rng: np.random.Generator, event_id: str, when: datetime | None = None,
    shift: np.ndarray | None = None, aged_days: float = 0.0,
) -> dict[str, object]:
    """One event: the customer's centre with a little per-event noise (and an optional drift
    ``shift`` multiplying the features), ``aged_days`` of calendar after the start."""
    values = customer.centre * rng.lognormal(0.0, 0.05, size=customer.centre.shape[0])
    if shift is not None:
        values = values * shift
    if aged_days:
        values = values + calendar_ageing(customer, aged_days)
    when = when or datetime.now(UTC)
    features: dict[str, float | int] = {}
    for name, v in zip(FEATURES, values.tolist(), strict=True):
        features[name] = round(v, 2) if name in ("monetary_90d", "avg_basket_value") else int(round(v))
    return {
        "customer_id": customer.customer_id,
        "event_time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "event_id": event_id,
        "features": features,
        "attributes": {"channel": customer.channel},
    }


def malformed_value(kind: str, customer: Customer, rng: np.random.Generator, event_id: str) -> bytes:
    """A message of one malformed kind (see ``MALFORMED_KINDS``) for a real customer."""
    if kind == "not_json":
        return f"customer={customer.customer_id};oops".encode()
    value = event_value(customer, rng, event_id)
    features = cast(dict[str, Any], value["features"])
    if kind == "missing_feature":
        del features["monetary_90d"]
    elif kind == "wrong_type":
        features["frequency_90d"] = "fourteen"
    elif kind == "non_finite":
        # json.dumps writes NaN, which Python producers (and many others) do emit.
        features["avg_basket_value"] = float("nan")
    else:
        raise ValueError(f"unknown malformed kind {kind}")
    return json.dumps(value).encode()
