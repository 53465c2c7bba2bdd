"""``make run``: the whole pipeline on the local stack, with a compact status line.

Starts the trainer and the consumer as processes (their logs go to ``$STACK_DIR/logs``, by default
``.stack/logs``), produces demo events in this process, and reads the output and dead-letter
topics as a downstream subscriber would. Stops on Ctrl-C or after ``DURATION`` seconds, drains,
prints a summary.

With ``KAFKA_SASL=1`` (a stack from ``KAFKA_SASL=1 make stack``, whose admin step ``make topics``
created the topics, users and ACLs) every part logs in as its own principal, with its password
from ``$STACK_DIR/kafka/secrets``: the trainer as ``trainer``, the consumer as ``consumer``, the
demo's events as ``producer`` and its reader as ``subscriber``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition

from demo.producer import DemoProducer
from segmentation.admin import SUBSCRIBER_GROUP_PREFIX, login, login_env, password_of
from segmentation.domain import CHANGE_CAUSES
from segmentation.kafka import client_common, ensure_topics, retrying
from segmentation.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
STATUS_EVERY_S = 5.0
DRAIN_TIMEOUT_S = 60.0


@dataclass
class Observed:
    """What a downstream subscriber saw of this run."""

    event_ids: set[str] = field(default_factory=set)
    by_version: Counter[int] = field(default_factory=Counter)
    by_segment: Counter[str] = field(default_factory=Counter)
    dead_letters: Counter[str] = field(default_factory=Counter)
    changes: Counter[str] = field(default_factory=Counter)  # segment changes by cause
    duplicates: int = 0


class Subscriber(threading.Thread):
    def __init__(self, settings: Settings, run_id: str) -> None:
        super().__init__(name="subscriber", daemon=True)
        self.settings = settings
        self.run_id = run_id
        self.observed = Observed()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        # the same bootstrap, passed-through options, password and log routing as the services
        self.consumer = Consumer({
            **client_common(settings), "group.id": f"{SUBSCRIBER_GROUP_PREFIX}demo-{run_id}",
            "enable.auto.commit": False, "isolation.level": "read_committed",
        })
        topics = [settings.segments_topic, settings.dlq_topic]
        if settings.changes_topic is not None:
            topics.append(settings.changes_topic)
        self.consumer.assign(self._from_end(topics))

    def _from_end(self, topics: list[str]) -> list[TopicPartition]:
        assignment = []
        for topic in topics:
            # a fresh broker answers NOT_LEADER_FOR_PARTITION for a moment after topic creation
            meta = retrying(partial(self.consumer.list_topics, topic, timeout=10), "list_topics")
            for p in meta.topics[topic].partitions:
                _, high = retrying(partial(self.consumer.get_watermark_offsets, TopicPartition(topic, p),
                                           timeout=10), "get_watermark_offsets")
                assignment.append(TopicPartition(topic, p, high))
        return assignment

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                for msg in self.consumer.consume(1000, 0.5):
                    if msg.error() is None:
                        self._observe(msg)
        finally:
            self.consumer.close()

    def _observe(self, msg: object) -> None:
        topic = msg.topic()  # type: ignore[attr-defined]
        with self.lock:
            if topic == self.settings.dlq_topic:
                headers = dict(msg.headers() or [])  # type: ignore[attr-defined]
                if headers.get("demo-run") == self.run_id.encode():
                    self.observed.dead_letters[headers.get("dlq.reason", b"?").decode()] += 1
                return
            record = json.loads(msg.value())  # type: ignore[attr-defined]
            event_id = record.get("event_id") or ""
            if not event_id.startswith(self.run_id + "-"):
                return
            if topic == self.settings.changes_topic:
                self.observed.changes[record["cause"]] += 1
                return
            if event_id in self.observed.event_ids:
                self.observed.duplicates += 1
                return
            self.observed.event_ids.add(event_id)
            self.observed.by_version[record["model_version"]] += 1
            self.observed.by_segment[f"{record['segment_id']} {record['segment']}"] += 1


def start_process(module: str, env: dict[str, str], log_dir: Path) -> subprocess.Popen[bytes]:
    log_file = (log_dir / f"{module.split()[0]}.log").open("ab")
    args = [sys.executable, "-m", *module.split()]
    # Own process group: a terminal Ctrl-C reaches only this orchestrator, which drains the
    # consumer before stopping it (a SIGINT to the whole group would stop it before the drain).
    return subprocess.Popen(args, env=env, stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT,
                            process_group=0)


def status_line(elapsed: float, producer: DemoProducer, observed: Observed, rate: float) -> str:
    version = max(observed.by_version) if observed.by_version else "-"
    segments = " ".join(f"{k.split(' ')[0]}:{v}" for k, v in sorted(observed.by_segment.items()))
    return (f"[{elapsed:5.0f}s] produced {producer.stats.sent} "
            f"({sum(producer.stats.malformed.values())} malformed) | scored "
            f"{len(observed.event_ids)} ({rate:.0f}/s) | model v{version} | segments {segments or '-'}"
            f" | dead letters {sum(observed.dead_letters.values())}"
            f" | changes {sum(observed.changes.values())}")


def stack_dir() -> Path:
    """The local stack's directory, as scripts/stack.sh finds it (relative to the project)."""
    return ROOT / (os.environ.get("STACK_DIR") or ".stack")


class Logins:
    """Who each part of the demo is to Kafka: on a SASL stack its own principal, else nobody."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        sasl = os.environ.get("KAFKA_SASL") == "1"
        self.secrets = stack_dir() / "kafka" / "secrets" if sasl else None

    def settings_of(self, principal: str) -> Settings:
        if self.secrets is None:
            return self.settings
        return login(self.settings, principal, password_of(principal, self.secrets))

    def env_of(self, principal: str) -> dict[str, str]:
        if self.secrets is None:
            return {}
        return login_env(self.settings, principal, password_of(principal, self.secrets))


def main() -> int:
    settings = load_settings()
    duration = float(os.environ["DURATION"]) if os.environ.get("DURATION") else None
    run_id = f"run{int(time.time())}"
    logins = Logins(settings)
    if logins.secrets is None:  # on a SASL stack the admin step (make topics) made them
        ensure_topics(settings)
    log_dir = stack_dir() / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "SEG_TRAIN_INTERVAL_S": os.environ.get("SEG_TRAIN_INTERVAL_S", "30"),
        "SEG_WINDOW_S": os.environ.get("SEG_WINDOW_S", "600"),
        # The demo's five profiles, one of them in two channels: chosen on the first small
        # window, K can start at 6 and every later retrain (K=5, a merge) then waits for an
        # operator's --accept. The service's own default chooses K.
        "SEG_K": os.environ.get("SEG_K", "5"),
    }
    children = {
        "trainer": start_process("trainer run", {**env, **logins.env_of("trainer"),
                                                 "SEG_METRICS_PORT": "9102"}, log_dir),
        "consumer": start_process("consumer", {**env, **logins.env_of("consumer"),
                                               "SEG_METRICS_PORT": "9101"}, log_dir),
    }
    try:
        return demo(logins, run_id, duration, children, log_dir)
    finally:
        stop_processes(children)


def demo(
    logins: Logins, run_id: str, duration: float | None,
    children: dict[str, subprocess.Popen[bytes]], log_dir: Path,
) -> int:
    subscriber = Subscriber(logins.settings_of("subscriber"), run_id)
    subscriber.start()
    producer = DemoProducer(
        logins.settings_of("producer"), run_id, rate=float(os.environ.get("DEMO_RATE", "300")),
        customers=int(os.environ.get("DEMO_CUSTOMERS", "3000")),
        drift=os.environ.get("DEMO_DRIFT", "0") == "1",
        lapse=os.environ.get("DEMO_DRIFT", "0") == "1",
        days_per_minute=float(os.environ.get("DEMO_DAYS_PER_MINUTE", "30")),
    )
    producing = threading.Thread(target=producer.run, args=(duration,), daemon=True)
    interrupted = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: interrupted.set())
    signal.signal(signal.SIGTERM, lambda *_: interrupted.set())
    print(f"run {run_id}: trainer and consumer started (logs in {log_dir}); "
          f"metrics on :9101 (consumer) and :9102 (trainer). Ctrl-C stops.", flush=True)
    started = time.monotonic()
    producing.start()
    last_count, last_at = 0, started
    while producing.is_alive() and not interrupted.is_set():
        interrupted.wait(STATUS_EVERY_S)
        now = time.monotonic()
        with subscriber.lock:
            count = len(subscriber.observed.event_ids)
            line = status_line(now - started, producer, subscriber.observed,
                               (count - last_count) / max(now - last_at, 1e-9))
        last_count, last_at = count, now
        print(line, flush=True)
        for name, proc in children.items():
            if proc.poll() is not None:
                print(f"{name} exited with {proc.returncode}; see {log_dir}", flush=True)
                interrupted.set()
    producer.stop.set()
    producing.join(60)
    elapsed = time.monotonic() - started
    print("stopping: draining the consumer ...", flush=True)
    drained = drain(subscriber, producer)
    stop_processes(children)
    subscriber.stop.set()
    subscriber.join(10)
    print_summary(run_id, elapsed, producer, subscriber.observed, drained)
    dead = sum(subscriber.observed.dead_letters.values())
    return 0 if drained and dead == sum(producer.stats.malformed.values()) else 1


def stop_processes(children: dict[str, subprocess.Popen[bytes]]) -> None:
    """SIGTERM (graceful: finish the batch, commit), then SIGKILL after a bound."""
    for proc in children.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in children.values():
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def drain(subscriber: Subscriber, producer: DemoProducer) -> bool:
    """Wait (bounded) until every event of this run has an output or a dead letter."""
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while time.monotonic() < deadline:
        with subscriber.lock:
            o = subscriber.observed
            if (len(o.event_ids) >= producer.stats.valid
                    and sum(o.dead_letters.values()) >= sum(producer.stats.malformed.values())):
                return True
        time.sleep(0.5)
    return False


def print_summary(
    run_id: str, elapsed: float, producer: DemoProducer, observed: Observed, drained: bool
) -> None:
    malformed = sum(producer.stats.malformed.values())
    dead = sum(observed.dead_letters.values())
    print(f"\nsummary of {run_id} ({elapsed:.0f} s)")
    print(f"  produced      {producer.stats.sent} events: {producer.stats.valid} valid, {malformed} "
          f"malformed {dict(producer.stats.malformed)}")
    print(f"  scored        {len(observed.event_ids)} of {producer.stats.valid} valid events "
          f"({len(observed.event_ids) / max(elapsed, 1e-9):.0f}/s), duplicates {observed.duplicates}"
          f"{'' if drained else '  (NOT fully drained)'}")
    print("  by model      " + ", ".join(f"v{v}: {n}" for v, n in sorted(observed.by_version.items())))
    print(f"  dead letters  {dead} {dict(observed.dead_letters)} "
          f"{'== malformed sent' if dead == malformed else f'!= {malformed} malformed sent'}")
    print("  changes       " + (", ".join(f"{cause} {observed.changes[cause]}" for cause in CHANGE_CAUSES
                                         if observed.changes[cause]) or "none"))
    print("  segments")
    for name, n in sorted(observed.by_segment.items(), key=lambda kv: int(kv[0].split()[0])):
        print(f"    {n:>7}  {name}")


if __name__ == "__main__":
    raise SystemExit(main())
