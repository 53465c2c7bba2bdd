"""The demo producer: realistic customer events at a steady rate, a small share malformed.

``python -m demo.producer`` runs it alone (``DEMO_RATE``, ``DEMO_CUSTOMERS``, ``DEMO_MALFORMED``,
``DURATION``, ``DEMO_DRIFT``). With ``DEMO_DRIFT=1`` the "bargain hunters" segment drifts: its
basket value and sessions grow steadily (by 2% per second of drift time, up to x4), towards
another segment, which is what the drift metrics and alerts must catch. With ``lapse`` as well
(``make run`` turns both on with ``DEMO_DRIFT=1``) customers change segments, which is what the
segment-change events must show: over ``LAPSE_S`` seconds one champion in five lapses (their
features move to the "at risk" profile's: ``behaviour`` changes) and another one in five cools
half way there and stays, between the two segments, where retrains move the boundary over some of
them (``model`` changes) and their events' noise moves others (``behaviour``).

The calendar runs too (``DEMO_DAYS_PER_MINUTE``, 30 by default in ``make run``): every
customer's tenure grows by that many days per minute of the run, and the quiet "at risk"
customers' recency with it, as real customers age between retrains; segment ids follow the
customers, so the ageing does not renumber them.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from confluent_kafka import Producer

from demo.generator import (
    FEATURES,
    MALFORMED_KINDS,
    PROFILES,
    Customer,
    event_value,
    make_customers,
    malformed_value,
)
from segmentation.kafka import producer_config
from segmentation.settings import Settings, load_settings

DRIFT_SEGMENT = 4  # bargain hunters
LAPSING_SEGMENT, LAPSED_PROFILE = 0, 3  # champions becoming at risk
LAPSE_S = 60.0
# Of the lapsing segment's customers (in the order they were made), the share of the way to the
# lapsed profile each one goes: one in five all the way, one in five half way, the rest stay.
LAPSE_COHORTS = (1.0, 0.5, 0.0, 0.0, 0.0)


@dataclass
class ProducerStats:
    valid: int = 0
    malformed: Counter[str] = field(default_factory=Counter)
    failed: int = 0

    @property
    def sent(self) -> int:
        return self.valid + sum(self.malformed.values())


def drift_shift(elapsed_s: float) -> np.ndarray:
    """Feature multipliers for the drifting segment after ``elapsed_s`` seconds of drift.

    >>> drift_shift(0.0).tolist()
    [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    >>> float(drift_shift(1000.0)[FEATURES.index("avg_basket_value")])
    4.0
    """
    factor = min(1.0 + 0.02 * elapsed_s, 4.0)
    shift = np.ones(len(FEATURES))
    shift[FEATURES.index("avg_basket_value")] = factor
    shift[FEATURES.index("sessions_30d")] = factor
    return shift


def lapse_shift(customer: Customer, elapsed_s: float) -> np.ndarray | None:
    """Feature multipliers that take a lapsing customer from their own centre towards the lapsed
    profile's means over ``LAPSE_S`` seconds (geometrically: the half way point is the middle in
    log space), as far as their cohort goes; None for a customer who does not lapse.

    >>> from demo.generator import PROFILES
    >>> champion = np.asarray(PROFILES[0].means, dtype=float)
    >>> lapse_shift(Customer("c-0", 0, champion, "app"), 0.0).tolist() == [1.0] * 6
    True
    >>> full = champion * lapse_shift(Customer("c-0", 0, champion, "app"), LAPSE_S)
    >>> np.allclose(full, PROFILES[LAPSED_PROFILE].means)
    True
    >>> half = champion * lapse_shift(Customer("c-5", 0, champion, "app"), 2 * LAPSE_S)
    >>> np.allclose(half, np.sqrt(champion * PROFILES[LAPSED_PROFILE].means))
    True
    >>> lapse_shift(Customer("c-10", 0, champion, "app"), LAPSE_S) is None
    True
    """
    if customer.segment != LAPSING_SEGMENT:
        return None
    index = int(customer.customer_id.rsplit("-", 1)[1]) // len(PROFILES)
    share = LAPSE_COHORTS[index % len(LAPSE_COHORTS)]
    if share == 0.0:
        return None
    f = share * min(elapsed_s / LAPSE_S, 1.0)
    target = np.asarray(PROFILES[LAPSED_PROFILE].means, dtype=float)
    return np.asarray((target / customer.centre) ** f)


class DemoProducer:
    def __init__(
        self, settings: Settings, run_id: str, rate: float = 300.0, customers: int = 3000,
        malformed_every: int = 100, drift: bool = False, seed: int = 7, lapse: bool = False,
        days_per_minute: float = 0.0,
    ) -> None:
        self.settings = settings
        self.run_id = run_id
        self.rate = rate
        self.malformed_every = malformed_every
        self.drift = drift
        self.lapse = lapse
        self.days_per_minute = days_per_minute
        self.rng = np.random.default_rng(seed)
        self.customers: list[Customer] = make_customers(customers, self.rng)
        self.producer = Producer(producer_config(settings))
        self.stats = ProducerStats()
        self.stop = threading.Event()
        self._seq = 0

    def _on_delivery(self, err: object, _msg: object) -> None:
        if err is not None:
            self.stats.failed += 1

    def send_one(self, started: float) -> None:
        self._seq += 1
        customer = self.customers[int(self.rng.integers(len(self.customers)))]
        event_id = f"{self.run_id}-{self._seq}"
        headers: list[tuple[str, str | bytes | None]] = [("demo-run", self.run_id.encode())]
        if self.malformed_every and self._seq % self.malformed_every == 0:
            kind = MALFORMED_KINDS[(self._seq // self.malformed_every) % len(MALFORMED_KINDS)]
            value = malformed_value(kind, customer, self.rng, event_id)
            self.stats.malformed[kind] += 1
        else:
            shift = None
            if self.drift and customer.segment == DRIFT_SEGMENT:
                shift = drift_shift(time.monotonic() - started)
            elif self.lapse:
                shift = lapse_shift(customer, time.monotonic() - started)
            aged = self.days_per_minute * (time.monotonic() - started) / 60.0
            value = json.dumps(event_value(customer, self.rng, event_id, shift=shift,
                                           aged_days=aged)).encode()
            self.stats.valid += 1
        self.producer.produce(self.settings.events_topic, key=customer.customer_id.encode(),
                              value=value, headers=headers, on_delivery=self._on_delivery)

    def run(self, duration_s: float | None = None) -> ProducerStats:
        """Send at ``rate`` events/s until stopped (or ``duration_s``), then flush."""
        started = time.monotonic()
        tick = 0.05
        while not self.stop.is_set():
            elapsed = time.monotonic() - started
            if duration_s is not None and elapsed >= duration_s:
                break
            due = int(elapsed * self.rate) - self.stats.sent
            for _ in range(max(due, 0)):
                self.send_one(started)
            self.producer.poll(0)
            time.sleep(tick)
        self.producer.flush(30)
        return self.stats


def main() -> int:
    settings = load_settings()
    duration = float(os.environ["DURATION"]) if os.environ.get("DURATION") else None
    producer = DemoProducer(
        settings, run_id=f"demo{int(time.time())}",
        rate=float(os.environ.get("DEMO_RATE", "300")),
        customers=int(os.environ.get("DEMO_CUSTOMERS", "3000")),
        drift=os.environ.get("DEMO_DRIFT", "0") == "1",
        lapse=os.environ.get("DEMO_DRIFT", "0") == "1",
        days_per_minute=float(os.environ.get("DEMO_DAYS_PER_MINUTE", "30")),
    )
    try:
        stats = producer.run(duration)
    except KeyboardInterrupt:
        producer.stop.set()
        stats = producer.stats
        producer.producer.flush(30)
    print(json.dumps({"valid": stats.valid, "malformed": dict(stats.malformed),
                      "failed": stats.failed}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
