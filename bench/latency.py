"""Latency at fixed producer rates, and scale-out, with the consumer as deployed: ``python -m
consumer`` processes, a producer in this process on the same machine (so the two compete for the
same cores, as they would not in production: stated in the report).

Latency of an event = the output record's timestamp (set by the consumer's producer when it
produces the assignment) minus the input record's timestamp (set here when it is produced)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np
from confluent_kafka import Producer

from bench.stage import consumer_processes, make_values, read_records, with_output
from segmentation.kafka import ensure_topics, producer_config
from segmentation.metrics import TrainerMetrics
from segmentation.settings import Settings
from segmentation.store import ModelStore, connect
from trainer.__main__ import train_config
from trainer.pipeline import train_once


@dataclass
class RateResult:
    target_per_s: int
    produced_per_s: float
    events: int
    scored: int
    p50_ms: float
    p99_ms: float
    max_ms: float

    @property
    def sustained(self) -> bool:
        """Every event scored, and the tail stays well under a second (the consumer kept up)."""
        kept_up = self.scored == self.events and self.p99_ms < 500
        return kept_up and self.produced_per_s > 0.9 * self.target_per_s


def produce_at(settings: Settings, values: list[bytes], rate: int) -> tuple[dict[str, int], float]:
    """Produce ``values`` at ``rate`` per second; returns each event id's input timestamp (ms)
    and the rate achieved."""
    producer = Producer(producer_config(settings))
    sent_at: dict[str, int] = {}
    ids = [json.loads(v)["event_id"] for v in values]
    started = time.perf_counter()
    sent = 0
    while sent < len(values):
        due = min(len(values), int((time.perf_counter() - started) * rate) + 1)
        while sent < due:
            now_ms = int(time.time() * 1000)
            producer.produce(settings.events_topic, key=f"c-{sent % 5000}", value=values[sent],
                             timestamp=now_ms)
            sent_at[ids[sent]] = now_ms
            sent += 1
        producer.poll(0)
        time.sleep(0.0005)
    achieved = len(values) / (time.perf_counter() - started)
    producer.flush(30)
    return sent_at, achieved


def at_rate(settings: Settings, rate: int, seconds: float) -> RateResult:
    tag = f"r{rate}x{int(time.time())}"
    values = make_values(int(rate * seconds), seed=rate, tag=tag)
    sent_at, achieved = produce_at(settings, values, rate)
    records = read_records(settings, settings.segments_topic, 10**9, timeout_s=3.0 + seconds / 5)
    latencies: list[float] = []
    for value, out_ms in records:
        event_id = json.loads(value)["event_id"]
        if event_id in sent_at:
            latencies.append(out_ms - sent_at.pop(event_id))
    lat = np.asarray(latencies or [float("nan")], dtype=np.float64)
    return RateResult(rate, achieved, len(values), len(latencies), float(np.percentile(lat, 50)),
                      float(np.percentile(lat, 99)), float(lat.max()))


def latency(settings: Settings, rates: list[int], ramp: list[int], seconds: float) -> list[RateResult]:
    """One consumer process; ``rates`` always, then ``ramp`` upwards until one is not sustained."""
    s = settings.model_copy(update={"events_topic": f"{settings.events_topic}-lat"})
    s = with_output(s, "lat")
    results = []
    with consumer_processes(s, 1):
        warm = at_rate(s, 500, 4.0)  # joined, model loaded, scoring
        if warm.scored < warm.events:
            raise SystemExit("latency: the consumer process did not score the warm-up events")
        for rate in rates:
            results.append(at_rate(s, rate, seconds))
        for rate in ramp:
            result = at_rate(s, rate, seconds)
            results.append(result)
            if not result.sustained:
                break
    return results


def scale_out(settings: Settings, n: int, processes: int) -> float:
    """Events/s of ``processes`` consumer processes in one group draining ``n`` events (the input
    topic's backlog, 6 partitions). They start paused (no model in their Redis namespace), join
    the group, and all begin when the model is published: first to last output record."""
    s = with_output(settings.model_copy(update={
        "redis_prefix": f"{settings.redis_prefix}-x{processes}",
        "models_topic": f"{settings.events_topic}-x{processes}-models",
    }), f"x{processes}")
    ensure_topics(s)
    with consumer_processes(s, processes):
        time.sleep(8.0)  # every process started and joined; partitions paused without a model
        store = ModelStore(connect(s), s.redis_prefix)
        if train_once(train_config(s), store, TrainerMetrics()).result != "published":
            raise SystemExit("scale-out: model not published")
        records = read_records(s, s.segments_topic, n, timeout_s=300)
    stamps = [t for _, t in records]
    if len(records) < n:
        raise SystemExit(f"scale-out: {len(records)} of {n} outputs")
    return len(records) / max((max(stamps) - min(stamps)) / 1000.0, 1e-3)
