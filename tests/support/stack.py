"""Helpers for tests against the real local stack (``make stack``): Kafka on 127.0.0.1:9092,
Redis on 127.0.0.1:6379. Settings with topics, group and Redis prefix of their own; producing and
reading; a consumer loop running in a thread; private brokers and Redis servers for the tests
that kill them; metrics read through the registry's public API."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import redis
from confluent_kafka import Consumer, Producer, TopicPartition
from pydantic import SecretStr

from consumer.service import build_delivery, build_loop
from demo.generator import Customer, event_value, make_customers
from segmentation.kafka import consumer_config, producer_config
from segmentation.metrics import ConsumerMetrics, TrainerMetrics
from segmentation.settings import Settings
from segmentation.store import CustomerStore, Keys, ModelStore, connect

STACK_HINT = "the local stack is not running: `make stack` (or `bash scripts/stack.sh up`)"








def make_settings(**overrides: Any) -> Settings:
    tag = uuid.uuid4().hex[:10]
    base: dict[str, Any] = {
        "events_topic": f"t{tag}-customer-events",
        "segments_topic": f"t{tag}-customer-segments",
        "dlq_topic": f"t{tag}-customer-events-dlq",
        "models_topic": f"t{tag}-segment-models",
        "changes_topic": f"t{tag}-segment-changes",
        "consumer_group": f"t{tag}-group",
        "redis_prefix": f"t{tag}",
        "batch_timeout_s": 0.2,
        "model_poll_s": 1.0,
        "min_rows": 50,
        "n_init": 4,
        # The scenarios on the stack are built around a known number of profiles; choosing K
        # (the default) is measured offline: tests/trainer/test_k_selection.py, test_realistic.py and
        # test_drift_scenarios.py.
        "k": 5,
        "replica_id": f"r{tag}",
        "transactional_id": f"t{tag}",
    }
    base.update(overrides)
    return Settings(**base)





def sample(metrics: ConsumerMetrics | TrainerMetrics, name: str, **labels: str) -> float:
    """A metric's current value through the registry's public API (0 before it exists).

    >>> m = ConsumerMetrics(); m.events.labels("scored").inc(3)
    >>> sample(m, "segment_events_total", outcome="scored")
    3.0
    """
    return metrics.registry.get_sample_value(name, labels) or 0.0


def start_redis(tmp_path: Path, port: int, *options: str) -> subprocess.Popen[bytes]:
    """A redis-server of the test's own (so stopping or filling it touches no other test), without
    persistence (a restart loses everything); returns once it answers."""
    proc = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", str(port), "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path), *options], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    wait_until(lambda: pings(url), 10, "private redis")
    return proc


def pings(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=0.5).ping())
    except redis.RedisError:
        return False


def empty_redis(settings: Settings) -> None:
    """Delete every key of ``settings``' prefix (what a Redis restart without its data does)."""
    client = connect(settings)
    keys = list(client.scan_iter(match=Keys(settings.redis_prefix).everything, count=1000))
    if keys:
        client.delete(*keys)











# --- producing -----------------------------------------------------------------------------
def produce_events(
    settings: Settings, customers: list[Customer], seed: int = 0, prefix: str = "e",
    shift: Callable[[Customer], np.ndarray | None] = lambda c: None,
) -> dict[str, Customer]:
    """One event per customer; returns event_id -> customer."""
    rng = np.random.default_rng(seed)
    producer = Producer(producer_config(settings))
    sent = {}
    for i, c in enumerate(customers):
        event_id = f"{prefix}-{i}"
        value = event_value(c, rng, event_id, shift=shift(c))
        producer.produce(settings.events_topic, key=c.customer_id, value=json.dumps(value))
        sent[event_id] = c
        if i % 1000 == 0:
            producer.poll(0)
    assert producer.flush(30) == 0
    return sent


def produce_raw(settings: Settings, messages: list[tuple[str, bytes]]) -> None:
    producer = Producer(producer_config(settings))
    for key, value in messages:
        producer.produce(settings.events_topic, key=key, value=value)
    assert producer.flush(30) == 0


def customers(n: int = 1500, seed: int = 1, prefix: str = "c") -> list[Customer]:
    return make_customers(n, np.random.default_rng(seed), prefix=prefix)


# --- reading ---------------------------------------------------------------------------------
@dataclass
class Received:
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]
    partition: int
    offset: int

    def json(self) -> dict[str, Any]:
        return json.loads(self.value or b"null")


def read_topic(
    settings: Settings, topic: str, until: Callable[[list[Received]], bool], timeout_s: float = 60.0,
    isolation: str = "read_committed",
) -> list[Received]:
    """Everything on ``topic`` from the beginning, until ``until(received)`` or the timeout."""
    consumer = Consumer({
        "bootstrap.servers": settings.kafka_bootstrap, "group.id": f"reader-{uuid.uuid4().hex}",
        "enable.auto.commit": False, "isolation.level": isolation,
    })
    meta = consumer.list_topics(topic, timeout=10).topics[topic]
    consumer.assign([TopicPartition(topic, p, 0) for p in meta.partitions])
    received: list[Received] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and not until(received):
            for m in consumer.consume(1000, 0.3):
                if m.error() is None:
                    raw = m.headers() or []
                    pairs = raw.items() if isinstance(raw, dict) else raw
                    headers = {k: v for k, v in pairs if isinstance(v, bytes)}
                    received.append(Received(m.key(), m.value(), headers,
                                             int(m.partition() or 0), int(m.offset() or 0)))
    finally:
        consumer.close()
    return received


def read_outputs(
    settings: Settings, event_ids: set[str], timeout_s: float = 60.0
) -> dict[str, dict[str, Any]]:
    """Latest output per event_id, waiting until every id in ``event_ids`` has one."""
    def done(rs: list[Received]) -> bool:
        return event_ids <= {r.json().get("event_id") for r in rs}

    records = read_topic(settings, settings.segments_topic, done, timeout_s)
    return {r.json()["event_id"]: r.json() for r in records}


# --- running the consumer in-process --------------------------------------------------------
def active_version(rc: RunningConsumer) -> int | None:
    """The model version a running consumer scores with (None before it has one)."""
    model = rc.loop.watcher.active
    return None if model is None else model.version


class RunningConsumer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = ConsumerMetrics()
        client = connect(settings)
        consumer = Consumer(consumer_config(settings, settings.exactly_once))
        self.loop = build_loop(
            settings, consumer, build_delivery(settings, consumer),
            ModelStore(client, settings.redis_prefix),
            CustomerStore.for_settings(settings), self.metrics,
        )
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.loop.run(self._stop.is_set)
        except BaseException as exc:  # noqa: BLE001 - surfaced by stop()
            self.error = exc
        finally:
            self.loop.close()

    def start(self) -> RunningConsumer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive(), "consumer did not stop"
        if self.error is not None:
            raise self.error


@contextmanager
def running_consumer(settings: Settings) -> Iterator[RunningConsumer]:
    rc = RunningConsumer(settings).start()
    try:
        yield rc
    finally:
        rc.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], bool], timeout_s: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what or predicate}")


# --- running services as processes ---------------------------------------------------------
def settings_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment that makes a `python -m consumer|trainer` process use ``settings``."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("SEG_")}
    for name, value in settings.model_dump(mode="json").items():
        secret = getattr(settings, name)
        if isinstance(secret, SecretStr):  # model_dump masks it
            value = secret.get_secret_value()
        if value is None:
            env[f"SEG_{name.upper()}"] = "null"
            continue
        env[f"SEG_{name.upper()}"] = value if isinstance(value, str) else json.dumps(value)
    env.update(extra)
    return env


def start_service(settings: Settings, module: str, log_path: Any, **extra: str) -> Any:
    import subprocess
    import sys

    return subprocess.Popen(
        [sys.executable, "-m", *module.split()], env=settings_env(settings, **extra),
        stdout=open(log_path, "ab"), stderr=subprocess.STDOUT,
    )


# --- a private broker, for tests that kill it ---------------------------------------------------
class PrivateBroker:
    """A Kafka broker of one test's own, started by scripts/stack.sh on free ports with its data
    in ``directory`` (the jars are shared with the local stack's). With ``sasl`` it is the
    ``KAFKA_SASL=1`` broker: SCRAM-SHA-512 clients, StandardAuthorizer, no ACL no access; the
    principals' passwords are in ``secrets`` (``password``, ``login``)."""

    def __init__(self, directory: Any, sasl: bool = False) -> None:
        import os
        from pathlib import Path

        root = Path(__file__).resolve().parents[2]  # tests/support/stack.py -> the repository
        self.script = root / "scripts" / "stack.sh"
        self.port = free_port()
        self.sasl = sasl
        self.secrets = Path(directory) / "kafka" / "secrets"
        self.env = {**os.environ, "STACK_DIR": str(directory), "KAFKA_PORT": str(self.port),
                    "KAFKA_CONTROLLER_PORT": str(free_port()), "KAFKA_SASL": "1" if sasl else "0"}
        for name in ("BROKER", "ADMIN", "PRODUCER", "CONSUMER", "TRAINER"):
            self.env.pop(f"KAFKA_{name}_PASSWORD", None)  # the generated ones, in secrets
        libs = root / ".stack" / "kafka" / "libs"
        (Path(directory) / "kafka").mkdir(parents=True, exist_ok=True)
        if libs.is_dir() and not (Path(directory) / "kafka" / "libs").exists():
            (Path(directory) / "kafka" / "libs").symlink_to(libs)
        self.pidfile = Path(directory) / "kafka.pid"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def password(self, principal: str) -> str:
        """The password stack.sh generated for ``principal`` (SASL broker)."""
        return (self.secrets / f"{principal}.password").read_text().strip()

    def login(self, principal: str) -> dict[str, str]:
        """``kafka_extra`` of a client logging in as ``principal`` (its password goes in
        ``kafka_password``)."""
        return {"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "SCRAM-SHA-512",
                "sasl.username": principal}

    def start(self) -> None:
        import subprocess

        subprocess.run(["bash", str(self.script), "kafka-start"], env=self.env, check=True,
                       capture_output=True, timeout=120)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        import os
        import signal

        os.kill(int(self.pidfile.read_text()), signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.kill(int(self.pidfile.read_text()), 0)
                time.sleep(0.1)
            except ProcessLookupError:
                return

    def stop(self) -> None:
        import subprocess

        subprocess.run(["bash", str(self.script), "kafka-stop"], env=self.env, capture_output=True,
                       timeout=120)
