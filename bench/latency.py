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

from bench.stage import consumer_processes, read_records, with_output
from bench.workloads import Workload, arriving, returning
from segmentation.kafka import ensure_topics, producer_config
from segmentation.metrics import TrainerMetrics
from segmentation.settings import Settings
from segmentation.store import ModelStore, connect
from trainer.__main__ import train_config
from trainer.pipeline import train_once


@dataclass
class RateResult:
    workload: str
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


def produce_at(settings: Settings, workload: Workload, rate: int) -> tuple[dict[str, int], float]:
    """Produce the workload's events at ``rate`` per second; returns each event id's input
    timestamp (ms) and the rate achieved."""
    values, keys = workload.values, workload.keys
    producer = Producer(producer_config(settings))
    sent_at: dict[str, int] = {}
    ids = [json.loads(v)["event_id"] for v in values]
    started = time.perf_counter()
    sent = 0
    while sent < len(values):
        due = min(len(values), int((time.perf_counter() - started) * rate) + 1)
        while sent < due:
            now_ms = int(time.time() * 1000)
            producer.produce(settings.events_topic, key=keys[sent], value=values[sent], timestamp=now_ms)
            sent_at[ids[sent]] = now_ms
            sent += 1
        producer.poll(0)
        time.sleep(0.0005)
    achieved = len(values) / (time.perf_counter() - started)
    producer.flush(30)
    return sent_at, achieved


def events_at(workload: str, rate: int, seconds: float, tag: str) -> Workload:
    """``rate * seconds`` events of ``workload``: ``returning`` (the same 5,000 customers as the
    throughput run) or ``arriving`` (half of the events a new customer's first)."""
    n = int(rate * seconds)
    if workload == "returning":
        return returning(n, seed=rate, tag=tag)
    return arriving(n, customers=n // 2, seed=rate, tag=tag)


def latencies_of(settings: Settings, sent_at: dict[str, int], seconds: float) -> list[tuple[int, float]]:
    """(input timestamp, latency) in ms of every event of ``sent_at`` found on the output topic."""
    records = read_records(settings, settings.segments_topic, 10**9, timeout_s=3.0 + seconds / 5)
    found = []
    for value, out_ms in records:
        event_id = json.loads(value)["event_id"]
        if event_id in sent_at:
            sent_ms = sent_at.pop(event_id)
            found.append((sent_ms, float(out_ms - sent_ms)))
    return found


def at_rate(settings: Settings, rate: int, seconds: float, workload: str = "returning") -> RateResult:
    events = events_at(workload, rate, seconds, f"r{rate}x{int(time.time())}")
    sent_at, achieved = produce_at(settings, events, rate)
    latencies = [lat for _, lat in latencies_of(settings, sent_at, seconds)]
    lat = np.asarray(latencies or [float("nan")], dtype=np.float64)
    return RateResult(workload, rate, achieved, len(events), len(latencies), float(np.percentile(lat, 50)),
                      float(np.percentile(lat, 99)), float(lat.max()))


def latency(settings: Settings, rates: list[int], ramp: list[int], seconds: float,
            workload: str = "returning") -> list[RateResult]:
    """One consumer process; ``rates`` always, then ``ramp`` upwards until one is not sustained."""
    s = settings.model_copy(update={"events_topic": f"{settings.events_topic}-lat-{workload}"})
    s = with_output(s, "lat")
    results = []
    with consumer_processes(s, 1):
        warm = at_rate(s, 500, 4.0, workload)  # joined, model loaded, scoring
        if warm.scored < warm.events:
            raise SystemExit("latency: the consumer process did not score the warm-up events")
        for rate in rates:
            results.append(at_rate(s, rate, seconds, workload))
        for rate in ramp:
            result = at_rate(s, rate, seconds, workload)
            results.append(result)
            if not result.sustained:
                break
    return results


@dataclass
class StartResult:
    """Latency from the moment a consumer process is started, the producer already at ``rate``."""

    workload: str
    rate: int
    events: int
    scored: int
    p99_after_ms: float  # p99 of the events produced from ``after_s`` to ``after_s + 10`` s
    after_s: float
    steady_after_s: float | None  # from when every later second's p99 is <= 50 ms (None: never)
    p99_by_second_ms: list[float]


def after_start(settings: Settings, rate: int, workload: str = "arriving", seconds: float = 20.0,
                after_s: float = 5.0) -> StartResult:
    """Start a consumer process and, at once, produce at ``rate`` for ``seconds``: the events
    of its first seconds wait for its start (joining the group, loading the model, rebuilding
    the change state of its partitions). p99 per second of production, and over the 10 s from
    ``after_s`` on."""
    s = settings.model_copy(update={"events_topic": f"{settings.events_topic}-start-{workload}"})
    s = with_output(s, "start")
    events = events_at(workload, rate, seconds, f"s{rate}x{int(time.time())}")
    with consumer_processes(s, 1):
        started_ms = int(time.time() * 1000)
        sent_at, _ = produce_at(s, events, rate)
        found = latencies_of(s, sent_at, seconds)
    by_second: dict[int, list[float]] = {}
    for sent_ms, lat in found:
        by_second.setdefault((sent_ms - started_ms) // 1000, []).append(lat)
    p99s = [float(np.percentile(by_second.get(i, [float("inf")]), 99)) for i in range(int(seconds))]
    window = [lat for sent_ms, lat in found if after_s * 1000 <= sent_ms - started_ms < (after_s + 10) * 1000]
    steady = next((float(i) for i in range(len(p99s)) if all(p <= 50.0 for p in p99s[i:])), None)
    return StartResult(workload, rate, len(events), len(found),
                       float(np.percentile(window, 99)) if window else float("inf"), after_s, steady, p99s)


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
