"""Per-customer state past one Redis node: a real three-node Redis Cluster started by the stack
script (private ports and data), idempotent writes across hash slots, a node restarted mid-stream."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from redis.cluster import RedisCluster

from segmentation.metrics import TrainerMetrics
from segmentation.settings import Settings
from segmentation.store import CustomerAssignment, CustomerStore
from tests.support.stack import customers, produce_events, read_outputs, running_consumer, sample, wait_until
from trainer.__main__ import train_config
from trainer.pipeline import train_once

pytestmark = pytest.mark.integration  # every test here runs against the local stack

ROOT = Path(__file__).resolve().parents[2]


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free and valid too."""
    while True:
        port = random.randrange(20000, 30000)
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue


class Cluster:
    def __init__(self, directory: Path) -> None:
        self.ports = [cluster_port() for _ in range(3)]
        self.directory = directory
        self.env = {**os.environ, "STACK_DIR": str(directory),
                    "REDIS_CLUSTER_PORTS": " ".join(map(str, self.ports))}

    def stack(self, *args: str) -> None:
        subprocess.run(["bash", str(ROOT / "scripts" / "stack.sh"), *args], env=self.env, check=True,
                       capture_output=True, timeout=120)

    def kill(self, port: int) -> None:
        pid = int((self.directory / "redis-cluster" / str(port) / "redis.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
                time.sleep(0.05)
            except ProcessLookupError:
                return

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"


@pytest.fixture
def cluster(tmp_path: Path, stack: None) -> Iterator[Cluster]:
    c = Cluster(tmp_path / "stack")
    c.stack("redis-cluster-up")
    try:
        yield c
    finally:
        c.stack("redis-cluster-down")


def assignment(customer: str, event_ms: int, segment_id: int) -> CustomerAssignment:
    return CustomerAssignment(customer, event_ms, event_ms, segment_id, f"s{segment_id}", 1, f"e{event_ms}")


def test_customer_writes_spread_over_every_node_and_stay_idempotent(
    cluster: Cluster, settings_factory: Callable[..., Settings]
) -> None:
    settings: Settings = settings_factory(customer_redis_url=cluster.url, customer_redis_cluster=True)
    store = CustomerStore.for_settings(settings)
    assert isinstance(store.client, RedisCluster)
    batch = [assignment(f"c{i}", 1000, i % 5) for i in range(2000)]
    assert store.write_latest(batch) == 2000
    older = [assignment(f"c{i}", 999, 9) for i in range(2000)]
    assert store.write_latest(older) == 0  # an older event never overwrites a newer assignment
    assert store.get("c7")["segment_id"] == "2"
    per_node = [store.client.get_node(host="127.0.0.1", port=p).redis_connection.dbsize()
                for p in cluster.ports]
    assert all(n > 400 for n in per_node), per_node
    assert store.client.ttl(store.key("c7")) > 0  # evictable under volatile-lru


@pytest.mark.system  # kills a node of a private Redis cluster: the system tier (make system)
def test_a_cluster_node_restarted_mid_stream_loses_no_output_and_state_catches_up(
    cluster: Cluster, settings_factory: Callable[..., Settings]
) -> None:
    settings: Settings = settings_factory(customer_redis_url=cluster.url, customer_redis_cluster=True,
                                          redis_timeout_s=0.3)
    from segmentation.store import ModelStore, connect

    population = customers(600)
    produce_events(settings, population, prefix="seed")
    assert train_once(train_config(settings), ModelStore(connect(settings), settings.redis_prefix),
                      _metrics()).result == "published"
    victim = cluster.ports[1]
    with running_consumer(settings) as rc:
        read_outputs(settings, {"seed-0"})
        cluster.kill(victim)
        during = produce_events(settings, population, seed=2, prefix="during")
        outputs = read_outputs(settings, set(during), timeout_s=60)  # outputs do not need Redis
        wait_until(lambda: sample(rc.metrics, "segment_customer_writes_skipped_total") > 0, 30,
                   "skipped writes")
        cluster.stack("redis-cluster-node-start", str(victim))  # same port, same nodes.conf
        wait_until(lambda: _cluster_ok(cluster), 30, "the node back in the cluster")
        after = produce_events(settings, population, seed=3, prefix="after")
        read_outputs(settings, set(after), timeout_s=60)
        store = CustomerStore.for_settings(settings)
        wait_until(lambda: _latest_all(store, population, "after"), 60, "every customer's latest state")
    assert set(during) <= set(outputs)
    skipped = sample(rc.metrics, "segment_customer_writes_skipped_total")
    assert 0 < skipped < len(during)  # only the dead node's customers were skipped


def _cluster_ok(cluster: Cluster) -> bool:
    """Every node, the restarted one included, sees the cluster as ok."""
    try:
        return all(redis.Redis(port=p, socket_timeout=1).cluster("info")["cluster_state"] == "ok"
                   for p in cluster.ports)
    except redis.RedisError:
        return False


def _latest_all(store: CustomerStore, population: list, prefix: str) -> bool:  # type: ignore[type-arg]
    try:
        return all(store.get(c.customer_id).get("event_id", "").startswith(prefix) for c in population)
    except redis.RedisError:
        return False


def _metrics() -> TrainerMetrics:
    return TrainerMetrics()
