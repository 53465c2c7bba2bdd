"""The throughput contenders, each reading the same input topic from its start with a group of
its own and writing to an output topic of its own, with the service's client settings:

* ``pipe``: the Kafka pipe limit. Consume and produce the same bytes, no work; the same
  at-least-once mechanics as the service (batches sized by what is waiting, acknowledgements of
  one batch overlapping the next, offsets stored once acknowledged).
* ``service``: the real consume loop (decode, validate, encode, assign, produce, acknowledge,
  store offsets, write Redis, learn online, metrics).
* ``naive``: a per-event consumer written the usual way: ``json.loads`` and pydantic validation
  per message, River's ``cluster.KMeans`` ``learn_one`` + ``predict_one`` per event, one
  ``json.dumps`` per output; per-batch acknowledgement wait, as a naive consumer does.
* ``naive_fast``: the per-event consumer a competent engineer writes first: ``orjson``, field
  checks by hand (no pydantic), River's ``preprocessing.StandardScaler`` and ``cluster.KMeans``
  per event, ``orjson.dumps``, produce, commit every 500 messages (asynchronously, once the
  producer's queue is flushed up to them, so nothing is committed before it is delivered).

Each returns the seconds from its first message to its last event's acknowledgement.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import resource
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, Message, Producer

from consumer.changes import ChangesUnavailable
from consumer.delivery import Sent
from consumer.partitions import next_offsets
from consumer.scoring import OutRecord
from consumer.service import build_changes, build_delivery, build_loop
from segmentation.events import CustomerEvent, event_time_iso
from segmentation.kafka import consumer_config, producer_config
from segmentation.metrics import ConsumerMetrics
from segmentation.settings import Settings
from segmentation.store import CustomerStore, ModelStore


def take(consumer: Consumer, size: int, timeout_s: float) -> list[Message]:
    """The service's batch sizing: what is waiting, else the first message to arrive and what
    came with it."""
    messages = consumer.consume(size, 0) or consumer.consume(1, timeout_s)
    if len(messages) == 1 and size > 1:
        messages += consumer.consume(size - 1, 0)
    return [m for m in messages if m.error() is None]


def deadline_for(n: int) -> float:
    """When a contender still short of ``n`` events is stuck (a wedged group, a lost message)
    and fails instead of hanging the benchmark: a minute, plus 2 ms per event."""
    return time.monotonic() + 60.0 + n / 500


def on_time(deadline: float, name: str, done: float, n: int) -> None:
    if time.monotonic() > deadline:
        raise RuntimeError(f"{name}: {done:,.0f} of {n:,} events by its deadline")


def pipe(s: Settings, n: int) -> float:
    consumer = Consumer(consumer_config(s, exactly_once=False))
    delivery = build_delivery(s, consumer)
    consumer.subscribe([s.events_topic])
    done, started, inflight, deadline = 0, 0.0, None, deadline_for(n)
    while done < n:
        on_time(deadline, "pipe", done, n)
        messages = take(consumer, s.batch_size, s.batch_timeout_s)
        if not messages:
            continue
        started = started or time.perf_counter()
        records = [OutRecord(s.segments_topic, m.key(), m.value(), [], m) for m in messages]
        sent = delivery.send(records, next_offsets(messages), lambda _r, _e: None)
        _finish(delivery, inflight)
        inflight = sent
        done += len(messages)
    _finish(delivery, inflight)
    took = time.perf_counter() - started
    delivery.close(10)
    consumer.close()
    return took


def _finish(delivery: Any, sent: Sent | None) -> None:
    if sent is not None:
        delivery.complete(sent)
        delivery.store(sent)


def service(s: Settings, store: ModelStore, n: int, on_start: Callable[[], None] | None = None) -> float:
    metrics = ConsumerMetrics()
    consumer = Consumer(consumer_config(s, exactly_once=False))
    loop = build_loop(s, consumer, build_delivery(s, consumer), store,
                      CustomerStore(store.client, s.redis_prefix), metrics)
    loop.subscribe()
    def scored() -> float:
        return metrics.registry.get_sample_value("segment_events_total", {"outcome": "scored"}) or 0.0

    started, deadline = 0.0, deadline_for(n)
    while scored() < n:
        on_time(deadline, "service", scored(), n)
        loop.step()
        if not started and (loop.checkpoint.in_flight is not None or scored()):
            started = time.perf_counter()
            if on_start is not None:
                on_start()
    took = time.perf_counter() - started
    loop.close()
    return took


class NaiveRiver:
    """Scale with the published bundle's parameters, then River's online K-Means, per event."""

    def __init__(self, store: ModelStore, seed: int = 42) -> None:
        from river import cluster

        bundle = store.load(store.current_version() or 1)
        self.spec = bundle.features
        self.k = bundle.k
        self.model = cluster.KMeans(n_clusters=bundle.k, halflife=0.5, sigma=3.0, seed=seed)

    def features(self, event: CustomerEvent) -> dict[str, float]:
        x: dict[str, Any] = {}
        for name, c, sc, log in zip(self.spec.numeric, self.spec.center, self.spec.scale,
                                    self.spec.log_mask().tolist(), strict=True):
            value = float(event.features[name])
            x[name] = ((math.copysign(math.log1p(abs(value)), value) if log else value) - c) / sc
        for attribute, values in self.spec.vocabulary.items():
            seen = event.attributes.get(attribute, "other")
            for v in values:
                x[f"{attribute}={v}"] = self.spec.categorical_weight if v == seen else 0.0
        return x

    def score(self, value: bytes) -> tuple[int, CustomerEvent]:
        event = CustomerEvent.model_validate(json.loads(value))
        for name in self.spec.numeric:
            if not math.isfinite(event.features[name]):
                raise ValueError(f"{name} is not finite")
        x = self.features(event)
        self.model.learn_one(x)
        return int(self.model.predict_one(x)), event


def naive(s: Settings, store: ModelStore, n: int) -> float:
    scorer = NaiveRiver(store)
    consumer = Consumer(consumer_config(s, exactly_once=False))
    delivery = build_delivery(s, consumer)
    consumer.subscribe([s.events_topic])
    done, started, deadline = 0, 0.0, deadline_for(n)
    while done < n:
        on_time(deadline, "naive", done, n)
        messages = [m for m in consumer.consume(s.batch_size, s.batch_timeout_s) if m.error() is None]
        if not messages:
            continue
        started = started or time.perf_counter()
        records = []
        for msg in messages:
            try:
                segment, event = scorer.score(msg.value() or b"")
            except (ValueError, KeyError):
                records.append(OutRecord(s.dlq_topic, msg.key(), msg.value(), [], msg))
                continue
            value = json.dumps({
                "customer_id": event.customer_id, "event_id": event.event_id,
                "event_time": event_time_iso(event.event_ms), "segment_id": segment,
                "segment": f"segment {segment}", "distance": 0.0, "model_version": 1,
                "scored_at": event_time_iso(int(time.time() * 1000)),
            }).encode()
            records.append(OutRecord(s.segments_topic, event.customer_id.encode(), value, [], msg))
        delivery.deliver(records, next_offsets(messages), lambda _r, _e: None)
        done += len(messages)
    took = time.perf_counter() - started
    delivery.close(10)
    consumer.close()
    return took


def naive_fast(s: Settings, store: ModelStore, n: int, commit_every: int = 500) -> float:
    import orjson
    from river import cluster, preprocessing

    bundle = store.load(store.current_version() or 1)
    names, k = list(bundle.features.numeric), bundle.k
    scaler = preprocessing.StandardScaler()
    kmeans = cluster.KMeans(n_clusters=k, halflife=0.5, sigma=3.0, seed=42)
    consumer = Consumer(consumer_config(s, exactly_once=False))
    producer = Producer(producer_config(s))
    consumer.subscribe([s.events_topic])
    done, started, since_commit, msg, deadline = 0, 0.0, 0, None, deadline_for(n)
    while done < n:
        msg = consumer.poll(s.batch_timeout_s)
        if msg is None or msg.error() is not None:
            on_time(deadline, "naive_fast", done, n)
            continue
        started = started or time.perf_counter()
        done += 1
        value = msg.value() or b""
        try:
            event = orjson.loads(value)
            features = event["features"]
            x = {name: float(features[name]) for name in names}
            if not all(math.isfinite(v) for v in x.values()) or not isinstance(event["customer_id"], str):
                raise ValueError("bad event")
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            producer.produce(s.dlq_topic, value=value, key=msg.key())
        else:
            scaler.learn_one(x)
            scaled = scaler.transform_one(x)
            kmeans.learn_one(scaled)
            segment = kmeans.predict_one(scaled)
            out = {"customer_id": event["customer_id"], "event_id": event.get("event_id"),
                   "event_time": event["event_time"], "segment_id": segment, "segment": f"segment {segment}",
                   "model_version": 1, "scored_at": time.time()}
            producer.produce(s.segments_topic, value=orjson.dumps(out), key=msg.key())
        producer.poll(0)
        since_commit += 1
        if since_commit >= commit_every:
            producer.flush(30)
            consumer.commit(message=msg, asynchronous=True)
            since_commit = 0
    producer.flush(30)
    took = time.perf_counter() - started
    if msg is not None:
        consumer.commit(message=msg, asynchronous=False)
    consumer.close()
    return took


STAGES = {  # where the consume loop's time goes, stage by stage (wall time, main thread unless said)
    "decode+encode+assign+build (score_batch)": ("consumer.loop", None, "score_batch"),
    "consume, and finishing when idle (_take)": ("consumer.loop", "ConsumeLoop", "_take"),
    "produce (send)": ("consumer.delivery", "AtLeastOnce", "send"),
    "await acknowledgements (complete)": ("consumer.delivery", "AtLeastOnce", "complete"),
    "segment changes: rebuild state (prepare)": ("consumer.changes", "SegmentChanges", "prepare"),
    "segment changes: detect": ("consumer.changes", "SegmentChanges", "detect"),
    "learn online": ("consumer.learner", "Learner", "learn"),
    "metrics (Reporter.count)": ("consumer.telemetry", "Reporter", "count"),
    "Redis customer write (writer thread)": ("consumer.customer_writer", "CustomerWriter", "write"),
}


def service_stages(s: Settings, store: ModelStore, n: int) -> dict[str, float]:
    """One more run of the service with each stage timed: microseconds per event by stage
    (stages nest: finishing a batch when idle is inside ``_take``)."""
    import importlib

    spent: dict[str, float] = dict.fromkeys(STAGES, 0.0)
    originals = []
    for label, (module_name, class_name, attr) in STAGES.items():
        module = importlib.import_module(module_name)
        owner = getattr(module, class_name) if class_name else module
        original = getattr(owner, attr)
        originals.append((owner, attr, original))

        def timed(*args: Any, _f: Any = original, _label: str = label, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return _f(*args, **kwargs)
            finally:
                spent[_label] += time.perf_counter() - started

        setattr(owner, attr, timed)
    def reset() -> None:  # joining the group and the first batch are not the loop's steady state
        for label in spent:
            spent[label] = 0.0

    try:
        took = service(s, store, n, on_start=reset)
    finally:
        for owner, attr, original in originals:
            setattr(owner, attr, original)
    return {"total_wall": took / n * 1e6, **{k: v / n * 1e6 for k, v in spent.items()}}


def produce_changes(s: Settings, customers: int, id_chars: int = 0) -> None:
    """``customers`` change records on partition 0 of the changes topic, one per customer, keyed
    ``c-<i>`` (padded with ``x`` to ``id_chars`` characters when given)."""
    assert s.changes_topic is not None
    producer = Producer({**producer_config(s), "batch.size": 1_000_000, "linger.ms": 50})
    for i in range(customers):
        key = f"c-{i}".ljust(id_chars, "x")
        value = (f'{{"customer_id":"{key}","event_id":"e-{i}","event_time":"2026-11-29T10:15:00.000Z",'
                 f'"cause":"initial","from_segment_id":null,"from_segment":null,"from_model_version":null,'
                 f'"to_segment_id":{i % 5},"to_segment":"segment {i % 5}","to_model_version":1,'
                 f'"changed_at":"2026-11-29T10:15:00.120Z"}}').encode()
        while True:
            try:
                producer.produce(s.changes_topic, key=key.encode(), value=value, partition=0)
                break
            except BufferError:  # the local queue is full: let deliveries drain it
                producer.poll(0.1)
    if producer.flush(600) != 0:
        raise RuntimeError("change records not all delivered")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _rebuild_in_child(s: Settings, customers: int, out: Any) -> None:
    """In a fresh process (its peak RSS is the rebuild's own): ``SegmentChanges.prepare`` until
    the partition's state is rebuilt, each call within ``SEG_DELIVERY_TIMEOUT_S``."""
    changes = build_changes(s, ConsumerMetrics(), lambda _v: None)
    before = _rss_mib()
    started, calls = time.perf_counter(), 0
    while 0 not in changes.state:
        calls += 1
        try:
            changes.prepare([_At(s.events_topic, 0)])
        except ChangesUnavailable:
            continue
    took = time.perf_counter() - started
    held = len(changes.state[0])
    after = _rss_mib()
    changes.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    out.send({"customers": held, "seconds": took, "calls": calls, "rss_before_mib": before,
              "rss_after_mib": after, "peak_rss_mib": peak})


def change_rebuild(s: Settings, customers: int, id_chars: int = 0) -> dict[str, float]:
    """How fast a member rebuilds a partition's last recorded segments from the changes topic
    (what a newly assigned partition waits for), and the memory it holds per customer:
    ``customers`` change records in one partition, read back by ``SegmentChanges.prepare`` in a
    fresh process, call after call (each bounded by ``SEG_DELIVERY_TIMEOUT_S``) until done."""
    produce_changes(s, customers, id_chars)
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_rebuild_in_child, args=(s, customers, send))
    child.start()
    result = receive.recv()
    child.join(60)
    if result["customers"] != customers:
        raise RuntimeError(f"rebuilt {result['customers']} customers of {customers}")
    per_customer = (result["rss_after_mib"] - result["rss_before_mib"]) * 2**20 / customers
    return {**result, "per_s": customers / result["seconds"], "bytes_per_customer": per_customer,
            "id_chars": id_chars or len(f"c-{customers - 1}")}


class _At:
    """A message of ``topic`` partition ``partition`` (all ``prepare`` looks at)."""

    def __init__(self, topic: str, partition: int) -> None:
        self._topic, self._partition = topic, partition

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return 0

    def key(self) -> bytes | None:
        return None

    def value(self) -> bytes | None:
        return None

    def headers(self) -> None:
        return None
