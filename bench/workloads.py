"""The event streams the benchmark measures, as a producer sends them (key = customer id).

* ``returning``: 5,000 customers cycled in order, so after the first 5,000 events every event
  belongs to a customer the consumer has seen (the first workload of the benchmark).
* ``arriving``: what production traffic looks like: customers keep arriving. Each event is a new
  customer's first with probability ``first_share`` (until ``customers`` have arrived), else it
  is a returning customer's, drawn from those who arrived; a returning customer switches to
  another behaviour with probability ``switch_share``, so a steady share of events changes
  segment.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from demo.generator import PROFILES, event_value, make_customers


@dataclass(frozen=True)
class Workload:
    name: str
    keys: list[bytes]
    values: list[bytes]
    customers: int  # distinct customers in the stream
    first_seen: float  # share of events that are a customer's first

    def __len__(self) -> int:
        return len(self.values)


def returning(n: int, seed: int = 0, tag: str = "b", customers: int = 5000) -> Workload:
    """``n`` events of ``customers`` customers (``c-<i>``) in turn.

    >>> w = returning(12, customers=5)
    >>> w.customers, w.first_seen, w.keys[:2], w.keys[5]
    (5, 0.4166666666666667, [b'c-0', b'c-1'], b'c-0')
    """
    rng = np.random.default_rng(seed)
    people = make_customers(min(n, customers), rng)
    values = [json.dumps(event_value(people[i % len(people)], rng, f"{tag}-{i}")).encode() for i in range(n)]
    keys = [people[i % len(people)].customer_id.encode() for i in range(n)]
    return Workload("returning", keys, values, len(people), len(people) / max(n, 1))


def arriving(n: int, customers: int, first_share: float = 0.5, switch_share: float = 0.05,
             seed: int = 0, tag: str = "a") -> Workload:
    """``n`` events in which customers keep arriving (see the module).

    >>> w = arriving(2000, customers=800, first_share=0.4, seed=1)
    >>> w.customers, round(w.first_seen, 2), len(set(w.keys)) == w.customers
    (800, 0.4, True)
    """
    rng = np.random.default_rng(seed)
    people = make_customers(customers, rng, prefix=f"{tag}c")
    rng.shuffle(people)  # arrivals in no profile order
    first = rng.random(n) < first_share
    switch = rng.random(n) < switch_share
    pick = rng.random(n)
    now = datetime.now(UTC)
    arrived = 0
    keys, values = [], []
    for i in range(n):
        if arrived == 0 or (first[i] and arrived < customers):
            who = people[arrived]
            arrived += 1
        else:
            who = people[int(pick[i] * arrived)]
            if switch[i]:
                segment = (who.segment + 1 + int(rng.integers(len(PROFILES) - 1))) % len(PROFILES)
                who.centre = np.asarray(PROFILES[segment].means) * rng.lognormal(0.0, 0.12, 6)
                who.segment = segment
        values.append(json.dumps(event_value(who, rng, f"{tag}-{i}", when=now)).encode())
        keys.append(who.customer_id.encode())
    return Workload("arriving", keys, values, arrived, arrived / max(n, 1))
