"""``make bench``: consumer throughput on the real local stack, as ratios to baselines measured
in the same run (the machines are shared and noisy; absolute numbers are printed for context).

* end to end: the service's consume loop (decode, validate, encode, score, produce outputs,
  await acks, store offsets, write Redis, learn online) vs a passthrough consumer with the same
  delivery mechanics that copies bytes without looking at them;
* CPU: ``score_batch`` per event vs ``json.loads`` per event (the floor of any JSON consumer).

Rounds alternate the two sides and the median is reported. ``BENCH_EVENTS`` (default 30000),
``BENCH_ROUNDS`` (default 3).
"""

from __future__ import annotations

import json
import os
import statistics
import time
import uuid
from dataclasses import dataclass

import numpy as np
from confluent_kafka import Consumer, Producer

from consumer.loop import ConsumeLoop
from consumer.model import ActiveModel
from consumer.scoring import ScoringRules, score_batch
from consumer.service import build_delivery
from demo.generator import event_value, make_customers
from segmentation.kafka import consumer_config, delete_topics, ensure_topics, producer_config
from segmentation.metrics import ConsumerMetrics, TrainerMetrics
from segmentation.settings import Settings
from segmentation.store import CustomerStore, ModelStore, connect
from trainer.pipeline import train_once


@dataclass
class FakeMessage:
    """Just enough of a Kafka message for the CPU benchmark."""

    _value: bytes
    _offset: int

    def topic(self) -> str:
        return "bench"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes:
        return b"k"

    def value(self) -> bytes:
        return self._value

    def headers(self) -> None:
        return None


def make_values(n: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    people = make_customers(min(n, 5000), rng)
    return [json.dumps(event_value(people[i % len(people)], rng, f"b-{i}")).encode() for i in range(n)]


def prepare(n: int) -> tuple[Settings, ModelStore]:
    tag = uuid.uuid4().hex[:8]
    settings = Settings(
        events_topic=f"bench{tag}-events", segments_topic=f"bench{tag}-segments",
        dlq_topic=f"bench{tag}-dlq", models_topic=f"bench{tag}-models",
        redis_prefix=f"bench{tag}", consumer_group=f"bench{tag}", batch_timeout_s=0.2,
    )
    ensure_topics(settings)
    producer = Producer(producer_config(settings))
    for i, value in enumerate(make_values(n)):
        producer.produce(settings.events_topic, key=f"c-{i % 5000}", value=value)
        if i % 2000 == 0:
            producer.poll(0)
    producer.flush(60)
    store = ModelStore(connect(settings), settings.redis_prefix)
    result = train_once(settings, store, TrainerMetrics())
    if result.result != "published":
        raise SystemExit(f"benchmark model not published: {result.detail}")
    return settings, store


def passthrough(settings: Settings, n: int, group: str) -> float:
    """Seconds to copy ``n`` events with the service's delivery mechanics and no work."""
    s = settings.model_copy(update={"consumer_group": group})
    consumer = Consumer(consumer_config(s, exactly_once=False))
    delivery = build_delivery(s, consumer)
    consumer.subscribe([s.events_topic])
    from consumer.loop import _next_offsets
    from consumer.scoring import OutRecord

    done = 0
    started = None
    while done < n:
        messages = [m for m in consumer.consume(s.batch_size, s.batch_timeout_s) if m.error() is None]
        if not messages:
            continue
        started = started or time.perf_counter()
        records = [OutRecord(s.segments_topic, m.key(), m.value(), []) for m in messages]
        delivery.deliver(records, _next_offsets(messages), lambda _r, _e: None)
        done += len(messages)
    took = time.perf_counter() - (started or time.perf_counter())
    delivery.close(10)
    consumer.close()
    return took


def service(settings: Settings, store: ModelStore, n: int, group: str) -> float:
    """Seconds for the real consume loop to score ``n`` events."""
    s = settings.model_copy(update={"consumer_group": group, "replica_id": group})
    metrics = ConsumerMetrics()
    consumer = Consumer(consumer_config(s, exactly_once=False))
    loop = ConsumeLoop(s, consumer, build_delivery(s, consumer), store,
                       CustomerStore(store.client, s.redis_prefix), metrics)
    loop.subscribe()
    scored = metrics.events.labels("scored")
    started = None
    while scored._value.get() < n:  # noqa: SLF001 - reading our own counter
        loop.step()
        if started is None and scored._value.get() > 0:  # noqa: SLF001
            started = time.perf_counter()
    took = time.perf_counter() - (started or time.perf_counter())
    loop.close()
    return took


def cpu(store: ModelStore, settings: Settings, n: int = 20000) -> tuple[float, float]:
    """Microseconds per event: json.loads alone, and score_batch (decode to output bytes)."""
    values = make_values(n, seed=1)
    messages = [FakeMessage(v, i) for i, v in enumerate(values)]
    model = ActiveModel.of(store.load(1))
    rules = ScoringRules.from_settings(settings)
    t = time.perf_counter()
    for v in values:
        json.loads(v)
    loads = (time.perf_counter() - t) / n * 1e6
    t = time.perf_counter()
    for i in range(0, n, settings.batch_size):
        score_batch(messages[i:i + settings.batch_size], model, rules)
    scoring = (time.perf_counter() - t) / n * 1e6
    return loads, scoring


def main() -> int:
    n = int(os.environ.get("BENCH_EVENTS", "30000"))
    rounds = int(os.environ.get("BENCH_ROUNDS", "3"))
    print(f"preparing {n} events on a fresh topic ...", flush=True)
    settings, store = prepare(n)
    try:
        base, svc, loads, scoring = [], [], [], []
        for r in range(rounds):
            base.append(passthrough(settings, n, f"{settings.consumer_group}-p{r}"))
            svc.append(service(settings, store, n, f"{settings.consumer_group}-s{r}"))
            lo, sc = cpu(store, settings)
            loads.append(lo)
            scoring.append(sc)
            print(f"round {r + 1}: passthrough {n / base[-1]:,.0f}/s, service {n / svc[-1]:,.0f}/s, "
                  f"json.loads {lo:.1f} us/event, score_batch {sc:.1f} us/event", flush=True)
        b, s_, lo, sc = (statistics.median(v) for v in (base, svc, loads, scoring))
        print(f"\n| measure (median of {rounds} rounds, {n} events) | baseline | service | ratio |")
        print("|---|---|---|---|")
        print(f"| end to end, events/s | passthrough {n / b:,.0f} | consume loop {n / s_:,.0f} | "
              f"{(n / s_) / (n / b):.2f}x of passthrough |")
        print(f"| CPU, us/event | json.loads {lo:.1f} | score_batch {sc:.1f} | {sc / lo:.1f}x json.loads |")
    finally:
        delete_topics(settings, [settings.events_topic, settings.segments_topic, settings.dlq_topic,
                                 settings.models_topic])
        keys = list(store.client.scan_iter(match=f"{settings.redis_prefix}:*"))
        if keys:
            store.client.delete(*keys)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
