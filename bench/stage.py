"""What every contender shares: the generated events, the topics they are read from, the model
they are scored with, and consumer processes started the way ``make run`` starts them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition

from bench.workloads import Workload, returning
from segmentation.kafka import (
    TopicReader,
    delete_topics,
    ensure_topics,
    producer_config,
    read_to_end,
    reader_config,
)
from segmentation.metrics import TrainerMetrics
from segmentation.settings import Settings
from segmentation.store import ModelStore, connect
from trainer.__main__ import train_config
from trainer.pipeline import train_once

LOGS = Path(__file__).resolve().parent / "results" / "logs"
STACK = Path(__file__).resolve().parent.parent / ".stack"  # make stack's pid files


def make_values(n: int, seed: int = 0, tag: str = "b", customers: int = 5000) -> list[bytes]:
    """``n`` demo events (five behavioural segments, ``customers`` customers in turn), as
    producers send them."""
    return returning(n, seed, tag, customers).values


def fresh_settings(**overrides: Any) -> Settings:
    tag = uuid.uuid4().hex[:8]
    base: dict[str, Any] = {
        "events_topic": f"bench{tag}-events", "segments_topic": f"bench{tag}-segments",
        "dlq_topic": f"bench{tag}-dlq", "models_topic": f"bench{tag}-models",
        "changes_topic": f"bench{tag}-changes",
        "redis_prefix": f"bench{tag}", "consumer_group": f"bench{tag}", "replica_id": f"bench{tag}",
        "batch_timeout_s": 0.2, "log_level": "WARNING",
    }
    base.update(overrides)
    return Settings(**base)


def with_output(settings: Settings, name: str) -> Settings:
    """The same input and model, another output topic and group (one per contender and run)."""
    s = settings.model_copy(update={
        "segments_topic": f"{settings.events_topic}-{name}-out",
        "dlq_topic": f"{settings.events_topic}-{name}-dlq",
        "changes_topic": f"{settings.events_topic}-{name}-changes",
        "consumer_group": f"{settings.consumer_group}-{name}",
        "replica_id": f"{settings.replica_id}-{name}",
    })
    ensure_topics(s)
    return s


def produce(settings: Settings, values: list[bytes], tag: str = "c", customers: int = 5000,
            keys: list[bytes] | None = None) -> None:
    """``values`` on the events topic, keyed ``keys`` (else ``<tag>-<i mod customers>``)."""
    producer = Producer(producer_config(settings))
    for i, value in enumerate(values):
        key = keys[i] if keys is not None else f"{tag}-{i % customers}"
        while True:
            try:
                producer.produce(settings.events_topic, key=key, value=value)
                break
            except BufferError:
                producer.poll(0.05)
        if i % 2000 == 0:
            producer.poll(0)
    producer.flush(60)


def prepare(workload: Workload) -> tuple[Settings, ModelStore]:
    """A fresh input topic holding the workload's events, and a model trained on them by the
    trainer."""
    settings = fresh_settings()
    ensure_topics(settings)
    produce(settings, workload.values, keys=workload.keys)
    store = ModelStore(connect(settings), settings.redis_prefix)
    result = train_once(train_config(settings), store, TrainerMetrics())
    if result.result != "published":
        raise SystemExit(f"benchmark model not published: {result.detail}")
    return settings, store


def cleanup(settings: Settings, store: ModelStore) -> None:
    """Delete every topic and Redis key of this run (topics named after its events topic)."""
    from confluent_kafka.admin import AdminClient

    from segmentation.kafka import client_common

    listed = AdminClient(client_common(settings)).list_topics(timeout=10).topics
    prefix = settings.events_topic.rsplit("-", 1)[0]
    delete_topics(settings, [t for t in listed if t.startswith(prefix)])
    keys = list(store.client.scan_iter(match=f"{settings.redis_prefix}*"))
    for i in range(0, len(keys), 1000):
        store.client.delete(*keys[i:i + 1000])


def clear_customers(store: ModelStore) -> None:
    """Delete the customers the last contender wrote to Redis, so that every run writes each
    of its customers (a replay of the same events finds them stored and writes nothing)."""
    keys = list(store.client.scan_iter(match=store.keys.customer("*"), count=5000))
    for i in range(0, len(keys), 1000):
        store.client.delete(*keys[i:i + 1000])


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes ``python -m consumer`` use ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEG_")}
    for name, value in settings.model_dump(mode="json").items():
        env[f"SEG_{name.upper()}"] = "null" if value is None else (
            value if isinstance(value, str) else json.dumps(value))
    return env


@contextmanager
def consumer_processes(settings: Settings, count: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``count`` consumer processes in one group, as deployed (``python -m consumer``)."""
    LOGS.mkdir(parents=True, exist_ok=True)
    procs = []
    for i in range(count):
        s = settings.model_copy(update={"replica_id": f"{settings.replica_id}-{i}"})
        log = open(LOGS / f"{s.replica_id}.log", "ab")  # noqa: SIM115 - closed with the process
        procs.append(subprocess.Popen([sys.executable, "-m", "consumer"], env=settings_env(s),
                                      stdout=log, stderr=subprocess.STDOUT))
    try:
        yield procs
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def read_records(settings: Settings, topic: str, expected: int, timeout_s: float) -> list[tuple[bytes, int]]:
    """(value, record timestamp in ms) of ``topic``'s records, until ``expected`` are read."""
    reader = Consumer(reader_config(settings, f"reader-{uuid.uuid4().hex[:6]}"))
    metadata = reader.list_topics(topic, timeout=10).topics[topic]
    reader.assign([TopicPartition(topic, p, 0) for p in metadata.partitions])
    records: list[tuple[bytes, int]] = []
    deadline = time.monotonic() + timeout_s
    while len(records) < expected and time.monotonic() < deadline:
        for msg in reader.consume(5000, 0.5):
            value = msg.value()
            if msg.error() is None and isinstance(value, bytes):
                records.append((value, msg.timestamp()[1]))
    reader.close()
    return records


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (``/proc/<pid>/stat``, all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after the command name, from field 3 on
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stack_pids() -> dict[str, int]:
    """The Redis server and the Kafka broker that ``make stack`` started (none when the stack
    runs elsewhere)."""
    pids = {}
    for name, file in (("redis", "redis.pid"), ("broker", "kafka.pid")):
        try:
            pids[name] = int((STACK / file).read_text().split()[0])
            _cpu_seconds(pids[name])
        except (OSError, ValueError, IndexError):
            pids.pop(name, None)
    return pids


@contextmanager
def cpu_meter() -> Iterator[dict[str, float]]:
    """CPU seconds used while the block runs, by this process (the contender: every contender
    runs in the benchmark's process) and by the stack's Redis and broker; filled on exit."""
    pids = stack_pids()
    before = {"consumer": time.process_time(), **{n: _cpu_seconds(p) for n, p in pids.items()}}
    used: dict[str, float] = {}
    yield used
    after = {"consumer": time.process_time()}
    for name, pid in pids.items():
        try:
            after[name] = _cpu_seconds(pid)
        except OSError:  # the process went away during the run: no figure rather than a wrong one
            continue
    used.update({name: after[name] - before[name] for name in after})


def topic_bytes(settings: Settings, topic: str) -> tuple[int, int]:
    """(records, key + value bytes) of everything ``topic`` holds now."""
    reader = TopicReader(settings, f"sizer-{uuid.uuid4().hex[:6]}")
    try:
        partitions = list(reader.records.list_topics(topic, timeout=10).topics[topic].partitions)
        count = size = 0
        for msg in read_to_end(reader, topic, partitions, timeout_s=120.0):
            count += 1
            size += len(msg.key() or b"") + len(msg.value() or b"")
    finally:
        reader.close()
    return count, size
