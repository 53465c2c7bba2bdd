"""The demo producer: realistic customer events at a steady rate, a small share malformed.

``python -m demo.producer`` runs it alone (``DEMO_RATE``, ``DEMO_CUSTOMERS``, ``DEMO_MALFORMED``,
``DURATION``, ``DEMO_DRIFT``). With ``DEMO_DRIFT=1`` the "bargain hunters" segment drifts: its
basket value and sessions grow steadily (by 2% per second of drift time, up to x4), towards
another segment, which is what the drift metrics and alerts must catch. With ``lapse`` as well
(``make run`` turns both on with ``DEMO_DRIFT=1``) customers change segments, which is what the
segment-change events must show: one champion in five lapses (over ``LAPSE_S`` seconds their
features move to the "at risk" profile's: ``behaviour`` changes), and only half of the bargain
hunters drift, so that retrains move the segment away from the half that stays (``model``
changes).
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
LAPSE_EVERY = 5  # one customer of the lapsing segment in this many lapses
LAPSE_S = 60.0


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


def lapse_shift(customer: Customer, elapsed_s: float) -> np.ndarray:
    """Feature multipliers that take a lapsing customer from their own centre to the lapsed
    profile's means, linearly over ``LAPSE_S`` seconds.

    >>> from demo.generator import PROFILES
    >>> c = Customer("c-0", 0, np.asarray(PROFILES[0].means, dtype=float), "app")
    >>> lapse_shift(c, 0.0).tolist() == [1.0] * 6
    True
    >>> (c.centre * lapse_shift(c, LAPSE_S)).tolist() == list(PROFILES[LAPSED_PROFILE].means)
    True
    """
    f = min(elapsed_s / LAPSE_S, 1.0)
    target = np.asarray(PROFILES[LAPSED_PROFILE].means, dtype=float)
    return ((1 - f) * customer.centre + f * target) / customer.centre


def lapses(customer: Customer) -> bool:
    """Whether ``customer`` is one of the lapsing champions (every ``LAPSE_EVERY``-th)."""
    return customer.segment == LAPSING_SEGMENT and int(customer.customer_id.rsplit("-", 1)[1]) % (
        LAPSE_EVERY * len(PROFILES)) == 0


def stays(customer: Customer) -> bool:
    """Whether ``customer`` is in the half of the drifting segment that does not drift when
    customers lapse too."""
    return int(customer.customer_id.rsplit("-", 1)[1]) % (2 * len(PROFILES)) < len(PROFILES)


class DemoProducer:
    def __init__(
        self, settings: Settings, run_id: str, rate: float = 300.0, customers: int = 3000,
        malformed_every: int = 100, drift: bool = False, seed: int = 7, lapse: bool = False,
    ) -> None:
        self.settings = settings
        self.run_id = run_id
        self.rate = rate
        self.malformed_every = malformed_every
        self.drift = drift
        self.lapse = lapse
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
            if self.drift and customer.segment == DRIFT_SEGMENT and not (self.lapse and stays(customer)):
                shift = drift_shift(time.monotonic() - started)
            elif self.lapse and lapses(customer):
                shift = lapse_shift(customer, time.monotonic() - started)
            value = json.dumps(event_value(customer, self.rng, event_id, shift=shift)).encode()
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
