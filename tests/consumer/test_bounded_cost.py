"""Bounded cost and a training sample nobody can steer; unit tier:
a dict stands in for Redis (``tests.support.fake_redis``), no broker.

* A bundle over ``SEG_MAX_BUNDLE_BYTES`` is refused by its length, never fetched or parsed, and
  the trainer refuses to publish one.
* An unchanged or already refused challenger is not parsed again (row 9).
* A new model ends the per-segment series of the ids it does not have (row 12).
* The versions a watcher refused or could not load are bounded (row 13).
* /healthz answers within a second while 64 slow clients are connected (row 7).
* Customer ids crafted to hash small under the old public salt are not over-represented (row 11).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from consumer.learner import Learner
from consumer.model import ActiveModel
from consumer.service import build_watcher
from consumer.telemetry import Reporter, count_by_segment
from consumer.watcher import REMEMBERED_VERSIONS, ModelWatcher
from segmentation.bundle import BundleError, ModelBundle
from segmentation.events import CustomerEvent
from segmentation.metrics import REQUEST_TIMEOUT_S, ConsumerMetrics, MetricsServer, serve
from segmentation.model_log import ModelLog
from segmentation.readback import Readback
from segmentation.settings import Settings
from segmentation.store import Keys, ModelStore
from tests.support.fake_redis import FakeRedis
from tests.support.messages import small_bundle
from tests.support.stack import wait_until
from trainer.window import CustomerSample, SampleKey, Window

KEYS = Keys("seg")
CAP = 65_536
SETTINGS = Settings(features=("a", "b"), categorical=("channel",), max_bundle_bytes=CAP,
                    kafka_bootstrap="127.0.0.1:1", model_poll_s=1e-9)  # every refresh polls


def bundle(version: int, segment_ids: list[int], base: int | None = None, pad: int = 0) -> bytes:
    """The small model's bundle; ``pad`` characters in its lineage make it as large as wanted."""
    lineage = {"topic": "t", "params": {"pad": "x" * pad}}
    return ModelBundle.model_validate(small_bundle(
        version=version, segment_ids=segment_ids, previous_version=base, lineage=lineage)).to_json().encode()


def rejected(metrics: ConsumerMetrics, reason: str) -> float:
    return metrics.registry.get_sample_value(
        "segment_readback_rejected_total", {"source": "redis_bundle", "reason": reason}) or 0.0


@contextmanager
def watching(**values: bytes) -> Iterator[tuple[FakeRedis, ModelWatcher, ConsumerMetrics, list[int]]]:
    """A watcher on a Redis holding v1 as the current model and ``values`` by key; the list
    holds the size of every bundle the store parses."""
    client = FakeRedis()
    client.data.update({KEYS.bundle(1): bundle(1, [0, 1]), KEYS.current: b"1", **values})
    metrics = ConsumerMetrics()
    store = ModelStore(client, "seg", Readback.of(SETTINGS, metrics.readback_rejected))  # type: ignore[arg-type]
    parsed: list[int] = []
    decode = store.decode

    def counting(stored: Any) -> ModelBundle:
        if stored.raw is not None:  # fetched: it will be parsed
            parsed.append(stored.size)
        return decode(stored)

    store.decode = counting  # type: ignore[method-assign]
    watcher = build_watcher(SETTINGS, store, metrics)
    yield client, watcher, metrics, parsed
    watcher.close()


def polls(watcher: ModelWatcher, n: int = 3) -> None:
    for _ in range(n):
        watcher.refresh()


# --- bundles have a size cap -------------------------------------------------------------------
def test_a_bundle_over_the_cap_is_refused_by_its_length_once_never_fetched_or_parsed() -> None:
    huge = bundle(2, [0, 2], base=1, pad=49 << 20)  # a 49 MiB challenger
    with watching(**{KEYS.challenger: huge}) as (client, watcher, metrics, parsed):
        polls(watcher)
        assert watcher.active is not None and watcher.active.version == 1
        assert watcher.challenger is None
        assert client.gets[KEYS.challenger] == 0 and parsed == [len(bundle(1, [0, 1]))]
        assert rejected(metrics, "too_large") == 1

        # a new current version over the cap: refused, remembered, never fetched
        client.data[KEYS.bundle(2)] = huge
        client.data[KEYS.current] = b"2"
        polls(watcher)
        assert watcher.active.version == 1 and client.gets[KEYS.bundle(2)] == 0
        assert rejected(metrics, "too_large") == 2


def test_a_bundle_within_the_cap_is_read_as_before() -> None:
    near = bundle(2, [0, 2], base=1, pad=CAP - 2000)
    assert len(near) <= CAP
    with watching(**{KEYS.challenger: near}) as (_, watcher, metrics, _parsed):
        polls(watcher, 1)
        assert watcher.challenger is not None and watcher.challenger.version == 2
        assert rejected(metrics, "too_large") == 0


def test_the_trainer_refuses_to_publish_a_bundle_over_the_cap() -> None:
    big = ModelBundle.model_validate_json(bundle(2, [0, 2], base=1, pad=CAP))
    models = ModelLog(SETTINGS)
    for write in (models.publish, lambda b: models.set_challenger(b, reserved=None)):  # type: ignore[arg-type]
        with pytest.raises(BundleError, match=r"v2 not published: bundle of \d+ bytes, more than 65536 "
                                              r"\(SEG_MAX_BUNDLE_BYTES\)"):
            write(big)


def test_the_cap_may_not_exceed_a_models_topic_record() -> None:
    with pytest.raises(ValueError, match="must fit in a models-topic record"):
        Settings(max_bundle_bytes=2_000_000)


# --- an unchanged or refused challenger is not parsed again ------------------------------------
def test_an_unchanged_or_refused_challenger_is_parsed_once_and_a_new_value_again() -> None:
    with watching(**{KEYS.challenger: bundle(2, [0, 2], base=1)}) as (client, watcher, metrics, parsed):
        polls(watcher)
        assert watcher.challenger is not None and watcher.challenger.version == 2
        assert len(parsed) == 2  # v1 once, the challenger once

        client.data[KEYS.challenger] = b'{"oops'  # refused: counted and logged once, not re-read
        polls(watcher)
        assert watcher.challenger is None and len(parsed) == 3
        assert rejected(metrics, "not_json") == 1

        client.data[KEYS.challenger] = bundle(3, [0, 3], base=1)
        polls(watcher)
        assert watcher.challenger is not None and watcher.challenger.version == 3 and len(parsed) == 4


def test_a_challenger_refused_against_one_model_is_judged_again_against_the_next() -> None:
    with watching(**{KEYS.challenger: bundle(3, [0, 3], base=2)}) as (client, watcher, _metrics, parsed):
        polls(watcher)
        assert watcher.challenger is None  # trained against v2, v1 in use
        client.data[KEYS.bundle(2)] = bundle(2, [0, 2], base=1)
        client.data[KEYS.current] = b"2"
        polls(watcher)
        assert watcher.active is not None and watcher.active.version == 2
        assert watcher.challenger is not None and watcher.challenger.version == 3
        assert len(parsed) == 4  # v1, the challenger against v1, v2, the challenger against v2


# --- per-segment series of retired ids ---------------------------------------------------------
def model(version: int, segment_ids: list[int]) -> ActiveModel:
    return ActiveModel.of(ModelBundle.model_validate_json(bundle(version, segment_ids)))


def series(metrics: ConsumerMetrics, name: str) -> set[str]:
    return {s.labels["segment_id"] for f in metrics.registry.collect() if f.name == name for s in f.samples}


def test_a_hundred_versions_leave_the_series_of_the_model_in_use_only() -> None:
    metrics = ConsumerMetrics()
    reporter = Reporter(SETTINGS.replica_id, None, None, metrics)  # type: ignore[arg-type] # lag and state unused
    learner = Learner(SETTINGS.half_life_events, SETTINGS.random_state, metrics)
    for version in range(1, 101):
        m = model(version, [2 * version, 2 * version + 1])  # every retrain retires both ids
        reporter.report(m, learner, set())
        ids = m.bundle.segment_ids
        for counter in (metrics.assignments, metrics.outliers, metrics.novel_events):
            count_by_segment(counter, ids, np.array([0, 1, 1]))
        for gauge in (metrics.share, metrics.centroid_drift):
            for sid in ids:
                gauge.labels(str(sid)).set(0.5)
    reporter.report(model(101, [200, 202]), learner, set())  # keeps 200, retires 201
    for name in ("segment_assignments", "segment_outlier_events", "segment_novel_events",
                 "segment_share", "segment_centroid_drift"):
        assert series(metrics, name) == {"200"}, name


# --- bounded memories ----------------------------------------------------------------------------
def test_the_versions_a_watcher_refused_or_could_not_load_are_bounded() -> None:
    with watching() as (client, watcher, _metrics, _parsed):
        polls(watcher, 1)
        for version in range(2, 2 + 3 * REMEMBERED_VERSIONS):  # pointers to versions that are not there
            client.data[KEYS.current] = str(version).encode()
            watcher.refresh()
            assert watcher.model_of(100_000 + version) is None
        assert watcher.active is not None and watcher.active.version == 1
        assert len(watcher._rejected) == len(watcher._unloadable) == REMEMBERED_VERSIONS


# --- the metrics server and slow clients -------------------------------------------------------
def healthz(address: tuple[str, int]) -> float:
    """Seconds /healthz took to answer 200 (fails beyond a second)."""
    started = time.monotonic()
    with urllib.request.urlopen(f"http://{address[0]}:{address[1]}/healthz", timeout=1) as answer:
        assert answer.status == 200 and answer.read() == b"ok\n"
    return time.monotonic() - started


def trickle(
    clients: list[socket.socket], request: bytes, every_s: float,
) -> tuple[threading.Event, threading.Event]:
    """Send ``request`` one byte every ``every_s`` on every client, in a thread, until the first
    event returned is set; the second is set after each round."""
    stop, sent = threading.Event(), threading.Event()

    def run() -> None:
        for i in range(len(request)):
            for client in clients:
                with contextlib.suppress(OSError):  # dropped by the server: its deadline passed
                    client.send(request[i:i + 1])
            sent.set()
            if stop.wait(every_s):
                return

    threading.Thread(target=run, name="slow-clients", daemon=True).start()
    return stop, sent


def test_healthz_answers_within_a_second_while_64_slow_clients_are_connected() -> None:
    server = serve(CollectorRegistry(), 0)
    clients = [socket.create_connection(server.server_address) for _ in range(64)]
    stop, sent = trickle(clients, b"GET /healthz HTTP/1.1\r\nHost: metrics\r\n\r\n", every_s=0.5)
    try:
        wait_until(lambda: server.connections_reading == 64, 5, "64 slow clients connected")
        took = []
        for _ in range(6):  # one probe per trickled byte, for 3 s: well within the slow requests
            sent.clear()
            assert sent.wait(2)
            took.append(healthz(server.server_address))
            assert server.connections_reading == 64
        assert max(took) < 1.0, took
        # the deadline is on the whole request: one byte every 0.5 s does not keep a connection
        wait_until(lambda: server.connections_reading == 0, REQUEST_TIMEOUT_S + 2, "slow clients dropped")
        assert healthz(server.server_address) < 1.0
    finally:
        stop.set()
        for client in clients:
            client.close()
        server.shutdown()
    assert server.server_address[0] == "127.0.0.1"  # loopback unless SEG_METRICS_HOST says otherwise


def test_beyond_its_connection_limit_the_server_closes_the_oldest_slow_client_for_a_probe() -> None:
    server = MetricsServer(CollectorRegistry(), lambda: True, "127.0.0.1", 0, max_connections=8)
    clients = [socket.create_connection(server.server_address) for _ in range(20)]  # never send
    try:
        wait_until(lambda: server.connections_reading == 8, 5, "the limit reached")
        assert healthz(server.server_address) < 1.0
        assert all(_closed_by_peer(c) for c in clients[:12])  # the oldest gave way
    finally:
        for client in clients:
            client.close()
        server.shutdown()


def _closed_by_peer(client: socket.socket) -> bool:
    client.settimeout(0.5)
    try:
        return client.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:  # reset
        return True


# --- the training sample cannot be steered -----------------------------------------------------
PUBLIC_SALT = (42).to_bytes(8, "little", signed=True)  # SEG_RANDOM_STATE's default, in every bundle


def public_hash(customer_id: str) -> int:
    """The sample's hash before it was keyed with a secret: salted with random_state."""
    digest = hashlib.blake2b(customer_id.encode(), digest_size=8, salt=PUBLIC_SALT).digest()
    return int.from_bytes(digest, "little")


def crafted_share(key: bytes, honest: list[str], crafted: set[str], cap: int) -> float:
    sample = CustomerSample(cap, key)
    for i, cid in enumerate(honest + sorted(crafted)):
        sample.offer(CustomerEvent.model_construct(customer_id=cid, event_time=i, features={}),
                     (0, i))
    kept = [e.customer_id for e in sample.events()]
    assert len(kept) == cap
    return sum(cid in crafted for cid in kept) / cap


def test_customer_ids_crafted_against_the_public_salt_are_not_over_represented() -> None:
    honest = [f"c-{i}" for i in range(20_000)]
    crafted = set(sorted((f"x-{i}" for i in range(200_000)), key=public_hash)[:1_000])  # 4.8% of the ids
    cap = 400
    # the attack as it was: the crafted ids are nearly all of the smallest public hashes
    smallest = sorted(honest + sorted(crafted), key=public_hash)[:cap]
    assert sum(cid in crafted for cid in smallest) / cap > 0.9
    # keyed with a per-run key or a deployment secret, they are their share of the customers
    for key in (SampleKey.per_run(), SampleKey.of_secret("a deployment secret, 16+ chars")):
        share = crafted_share(key.key, honest, crafted, cap)
        assert share < 0.1, (key.source, share)  # 4.8% expected, sd 1.1%


def test_the_bundle_records_the_sample_key_s_hash_never_the_key() -> None:
    secret = "a deployment secret, 16+ chars"
    key = SampleKey.of_secret(secret)
    record = json.dumps(Window([], [], 0, 0, sampled=True, key=key).sample_record())
    assert secret not in record and key.key.hex() not in record and key.fingerprint in record
    assert secret not in repr(Settings(sample_salt=secret)) and secret not in repr(key)
    with pytest.raises(ValueError, match="at least 16 characters"):
        Settings(sample_salt="short")

