"""The consumer against the real broker and Redis: delivery, hot swap, outages, lifecycle."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import ConsumerGroupTopicPartitions
from confluent_kafka.admin import AdminClient

from demo.generator import Customer
from segmentation.metrics import TrainerMetrics
from segmentation.settings import Settings
from segmentation.store import CustomerStore, Keys, ModelStore, ReplicaStates, connect
from tests.support.stack import (
    PrivateBroker,
    active_version,
    customers,
    empty_redis,
    free_port,
    make_settings,
    produce_events,
    read_outputs,
    read_topic,
    running_consumer,
    sample,
    start_redis,
    start_service,
    wait_until,
)
from trainer.__main__ import train_config
from trainer.pipeline import train_once

pytestmark = pytest.mark.integration  # every test here runs against the local stack


def published(settings: Settings) -> ModelStore:
    store = ModelStore(connect(settings), settings.redis_prefix)
    assert train_once(train_config(settings), store, TrainerMetrics()).result == "published"
    return store


def committed(settings: Settings) -> dict[int, int]:
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    futures = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(settings.consumer_group)])
    result = next(iter(futures.values())).result()
    return {tp.partition: tp.offset for tp in result.topic_partitions if tp.offset >= 0}


def members(settings: Settings) -> dict[str, set[int]]:
    """Group member client ids -> partitions, from the broker."""
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    group = admin.describe_consumer_groups([settings.consumer_group])[settings.consumer_group].result()
    return {m.member_id: {tp.partition for tp in m.assignment.topic_partitions} for m in group.members}


@pytest.mark.system  # kills a consumer process: the system tier (make system)
@pytest.mark.parametrize("delivery", ["at-least-once", "exactly-once"])
def test_a_consumer_killed_mid_stream_and_restarted_loses_nothing(
    settings_factory: Callable[..., Settings], tmp_path: Path, delivery: str
) -> None:
    settings = settings_factory(delivery=delivery, batch_size=200)
    seed_events = produce_events(settings, customers(600), prefix="seed")
    published(settings)
    log = tmp_path / "consumer.log"
    proc = start_service(settings, "consumer", log)
    sent = dict(seed_events)
    try:
        # keep producing while the consumer works, then kill it without warning
        sent |= produce_events(settings, customers(3000, seed=5), prefix="live")
        wait_until(lambda: len(read_topic(settings, settings.segments_topic, lambda rs: len(rs) > 500,
                                          5)) > 500, 30, "some outputs before the kill")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        sent |= produce_events(settings, customers(500, seed=9), prefix="after")
        proc = start_service(settings, "consumer", log)
        outputs = read_topic(
            settings, settings.segments_topic,
            lambda rs: set(sent) <= {r.json()["event_id"] for r in rs}, 90,
        )
    finally:
        proc.terminate()
        proc.wait(20)
    ids = [r.json()["event_id"] for r in outputs]
    assert set(sent) <= set(ids), f"lost {len(set(sent) - set(ids))} events; log: {log.read_text()[-2000:]}"
    if settings.exactly_once:
        # a read_committed reader sees each event exactly once, even across the SIGKILL
        assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} duplicates"


def test_two_consumers_split_the_partitions_and_a_leaver_hands_them_over(
    settings: Settings, tmp_path: Path
) -> None:
    produce_events(settings, customers(600), prefix="seed")
    published(settings)
    a = start_service(settings, "consumer", tmp_path / "a.log", SEG_REPLICA_ID="a")
    b = start_service(settings, "consumer", tmp_path / "b.log", SEG_REPLICA_ID="b")
    try:
        wait_until(lambda: sorted(len(p) for p in members(settings).values()) == [3, 3], 45,
                   "both members to own 3 of the 6 partitions")
        a.send_signal(signal.SIGTERM)
        assert a.wait(20) == 0
        wait_until(lambda: [len(p) for p in members(settings).values()] == [6], 45,
                   "the remaining member to own all 6 partitions")
        sent = produce_events(settings, customers(1200, seed=3), prefix="after")
        outputs = read_outputs(settings, set(sent), timeout_s=60)
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.terminate()
                p.wait(20)
    assert set(sent) <= set(outputs)


def test_outputs_carry_non_decreasing_model_versions_per_partition(settings: Settings) -> None:
    population = customers(1000)
    produce_events(settings, population, prefix="seed")
    store = published(settings)
    stop = threading.Event()
    sent: dict[str, object] = {}

    def keep_producing() -> None:
        round_ = 0
        while not stop.is_set():
            round_ += 1
            sent.update(produce_events(settings, population[:300], seed=round_, prefix=f"r{round_}"))
            time.sleep(0.1)

    with running_consumer(settings) as rc:
        producer = threading.Thread(target=keep_producing)
        producer.start()
        for expected in (2, 3):
            time.sleep(1.5)
            assert train_once(train_config(settings), store, TrainerMetrics()).version == expected
            def on_version(v: int = expected) -> bool:
                return active_version(rc) == v

            wait_until(on_version, 15, f"swap to v{expected}")
        time.sleep(1.5)
        stop.set()
        producer.join()
        outputs = read_topic(settings, settings.segments_topic,
                             lambda rs: set(sent) <= {r.json()["event_id"] for r in rs}, 60)
    versions_by_partition: dict[int, list[int]] = {}
    for r in sorted(outputs, key=lambda r: (r.partition, r.offset)):
        versions_by_partition.setdefault(r.partition, []).append(r.json()["model_version"])
    assert {v for vs in versions_by_partition.values() for v in vs} == {1, 2, 3}
    for partition, versions in versions_by_partition.items():
        assert versions == sorted(versions), f"partition {partition} went back to an older model"


@pytest.mark.parametrize("poison", ["wrong_shape", "nan", "wrong_features", "not_json"])
def test_a_poisoned_bundle_is_rejected_and_scoring_continues(settings: Settings, poison: str) -> None:
    population = customers(600)
    produce_events(settings, population, prefix="seed")
    store = published(settings)
    good = json.loads(store.client.get(store.keys.bundle(1)) or b"")
    bad = dict(good, version=2)
    if poison == "wrong_shape":
        bad["centroids"] = [row[:-1] for row in good["centroids"]]
    elif poison == "nan":
        bad["centroids"] = [[float("nan")] * len(good["centroids"][0])] + good["centroids"][1:]
    elif poison == "wrong_features":
        bad["features"] = dict(good["features"], numeric=["a", "b", "c", "d", "e", "f"])
    raw = b"\x80\x04 not json" if poison == "not_json" else json.dumps(bad).encode()
    with running_consumer(settings) as rc:
        read_outputs(settings, {"seed-0"})
        store.client.set(f"{settings.redis_prefix}:bundle:2", raw)
        store.client.set(f"{settings.redis_prefix}:current", 2)
        store.client.publish(store.keys.models_channel, "2")
        wait_until(lambda: sample(rc.metrics, "segment_bundle_rejections_total") >= 1, 15, "the rejection")
        sent = produce_events(settings, population[:200], seed=2, prefix="after")
        outputs = read_outputs(settings, set(sent))
        assert active_version(rc) == 1
    assert {outputs[e]["model_version"] for e in sent} == {1}


@pytest.mark.system  # kills a private Redis: the system tier (make system)
def test_scoring_continues_through_a_redis_outage_and_customer_state_catches_up(
    settings_factory: Callable[..., Settings], tmp_path: Path
) -> None:
    """A private Redis server, so that stopping it touches no other test."""
    port = free_port()
    redis_proc = start_redis(tmp_path, port)
    try:
        settings = settings_factory(redis_url=f"redis://127.0.0.1:{port}/0", redis_timeout_s=0.3)
        population = customers(600)
        produce_events(settings, population, prefix="seed")
        published(settings)
        with running_consumer(settings) as rc:
            read_outputs(settings, {"seed-0"})
            bundle = connect(settings).get(f"{settings.redis_prefix}:bundle:1")
            redis_proc.terminate()
            redis_proc.wait(10)
            during = produce_events(settings, population, seed=2, prefix="during")
            outputs = read_outputs(settings, set(during), timeout_s=60)  # outputs keep flowing
            assert set(during) <= set(outputs)
            assert sample(rc.metrics, "segment_customer_writes_skipped_total") > 0
            # the outage lasts until every customer write of those events was tried and skipped
            wait_until(lambda: sample(rc.metrics, "segment_customer_writes_skipped_total") >= len(during),
                       60, "the writes during the outage skipped")
            redis_proc = start_redis(tmp_path, port)
            connect(settings).set(Keys(settings.redis_prefix).bundle(1), bundle or b"")  # no persistence
            after = produce_events(settings, population, seed=3, prefix="after")
            read_outputs(settings, set(after), timeout_s=60)
            customers_store = CustomerStore(connect(settings), settings.redis_prefix)
            wait_until(lambda: all(customers_store.get(c.customer_id).get("event_id", "").startswith("after")
                                   for c in population[:50]), 30, "customer state to catch up")
    finally:
        redis_proc.terminate()
        redis_proc.wait(10)


def test_sigterm_under_load_exits_within_the_bound_with_offsets_committed(
    settings_factory: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = settings_factory(shutdown_timeout_s=10.0, batch_size=100)
    produce_events(settings, customers(600), prefix="seed")
    published(settings)
    port = free_port()
    proc = start_service(settings, "consumer", tmp_path / "c.log", SEG_METRICS_PORT=str(port))
    stop = threading.Event()
    produced = threading.Thread(target=lambda: [
        produce_events(settings, customers(500, seed=i), seed=i, prefix=f"load{i}")
        for i in range(100) if not stop.is_set()])
    produced.start()
    try:
        wait_until(lambda: sum(committed(settings).values()) > 1000, 45, "some commits under load")
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        took = time.monotonic() - began
    finally:
        stop.set()
        produced.join(60)
        if proc.poll() is None:
            proc.kill()
    assert code == 0
    assert took <= settings.shutdown_timeout_s
    # everything that has an output was committed: a restart would not replay it
    outputs = read_topic(settings, settings.segments_topic, lambda rs: False, 5)
    assert sum(committed(settings).values()) == len({r.json()["event_id"] for r in outputs})


def test_healthz_is_alive_and_readyz_waits_for_a_model_and_partitions(
    settings: Settings, tmp_path: Path
) -> None:
    import urllib.error
    import urllib.request

    def status(path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
                return int(r.status)
        except urllib.error.HTTPError as e:
            return int(e.code)
        except OSError:
            return -1

    produce_events(settings, customers(300), prefix="seed")
    port = free_port()
    proc = start_service(settings, "consumer", tmp_path / "c.log", SEG_METRICS_PORT=str(port))
    try:
        wait_until(lambda: status("/healthz") == 200, 20, "/healthz")
        time.sleep(2)
        assert status("/readyz") == 503  # no model yet
        published(settings)
        wait_until(lambda: status("/readyz") == 200, 30, "/readyz after the first model")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            assert b"segment_model_version 1.0" in r.read()
    finally:
        proc.terminate()
        proc.wait(20)


def test_the_online_centroid_follows_a_shifted_segment_where_plain_partial_fit_lags(
    settings_factory: Callable[..., Settings],
) -> None:
    """Runs the real consumer on a shifted stream, reads its online centroids from Redis, and
    replays the same encoded stream through a never-forgetting model for comparison."""
    import numpy as np

    from consumer.online import OnlineKMeans
    from demo.generator import FEATURES
    from segmentation.events import CustomerEvent

    half_life = 2000.0
    settings = settings_factory(half_life_events=half_life)
    population = customers(1000)
    produce_events(settings, population, prefix="seed")
    store = published(settings)
    bundle = store.load(1)
    shift = np.ones(len(FEATURES))
    # a drift within the segment's envelope (a jump past it is an outlier: flagged, not learned)
    shift[FEATURES.index("avg_basket_value")] = 1.6
    moved_segment = 4  # bargain hunters: profile index in demo.generator.PROFILES
    shifted = lambda c: shift if c.segment == moved_segment else None  # noqa: E731
    sent: dict[str, object] = {}
    with running_consumer(settings) as rc:
        for round_ in range(5):  # 5000 events after the shift, 1000 of them of that segment
            sent |= produce_events(settings, population, seed=10 + round_, prefix=f"s{round_}",
                                   shift=shifted)
        read_outputs(settings, set(sent), timeout_s=60)
        # outputs are acknowledged before the batch is learned: wait for the last one
        learner = rc.loop.learner
        wait_until(lambda: learner.online is not None
                   and learner.online.events_seen + learner.online.events_left_out == len(sent) + 1000,
                   30, "the last batch learned")
        # publish the replica state now
        rc.loop.reporter.report(rc.loop.watcher.active, learner, rc.loop.membership.assigned, force=True)
        assert learner.online is not None
        online_seen = learner.online.events_seen + learner.online.events_left_out
        left_out = learner.online.events_left_out
    state = ReplicaStates.of(store).all()[0]
    online = np.asarray(state["online_centroids"])
    # where the moved segment's centre really is now, in the model's scaled space
    moved = [CustomerEvent.model_validate(e) for e in _shifted_events(population, moved_segment, shift)]
    target = bundle.features.encode(moved)[0].mean(axis=0)
    index = int(np.argmin(np.linalg.norm(bundle.centroid_array() - target, axis=1)))
    start_gap = np.linalg.norm(bundle.centroid_array()[index] - target)
    online_gap = np.linalg.norm(online[index] - target)
    # the same stream through plain partial_fit (counts never decay)
    plain = OnlineKMeans(bundle.centroid_array(), np.asarray(bundle.quality.shares), None)
    events = [CustomerEvent.model_validate_json(r.value or b"") for r in read_topic(
        settings, settings.events_topic, lambda rs: len(rs) >= online_seen, 30)]
    x = bundle.features.encode(events)[0]
    for i in range(0, len(x), 500):
        plain.learn(x[i:i + 500])
    plain_gap = np.linalg.norm(plain.centroids[index] - target)
    assert online_seen == len(sent) + 1000  # the seed events are scored too
    assert left_out <= 0.01 * online_seen  # a drift inside the envelope is learned, not left out
    assert online_gap <= 0.5 * start_gap, (start_gap, online_gap)
    assert plain_gap > 2 * online_gap, (plain_gap, online_gap)


def _shifted_events(population: list[Customer], segment: int, shift: np.ndarray) -> list[dict[str, object]]:
    from demo.generator import event_value

    rng = np.random.default_rng(99)
    return [event_value(c, rng, "x", shift=shift) for c in population if c.segment == segment]


def test_an_older_event_never_overwrites_a_newer_customer_assignment(settings: Settings) -> None:
    from segmentation.store import CustomerAssignment

    store = CustomerStore(connect(settings), settings.redis_prefix)

    def write(event_ms: int, offset: int, segment_id: int) -> int:
        return store.write_latest([CustomerAssignment("c-1", event_ms, offset, segment_id,
                                                      f"s{segment_id}", 1, f"e{offset}")])

    assert write(2000, 10, 3) == 1
    assert write(1000, 11, 4) == 0  # older event time, even at a later offset
    assert write(2000, 9, 5) == 0  # same time, earlier offset: a replay
    assert write(2000, 10, 6) == 0  # the very same event replayed
    assert store.get("c-1")["segment_id"] == "3"
    assert write(3000, 12, 7) == 1
    assert store.get("c-1")["segment_id"] == "7"


@pytest.mark.system  # kills a private broker: the system tier (make system)
def test_a_broker_killed_mid_stream_loses_nothing_and_duplicates_at_most_what_was_in_flight(
    tmp_path: Path,
) -> None:
    """SIGKILL of the broker while events flow, restart on the same data: deliveries fail with
    transient errors and are retried (only the unacknowledged records), so every event gets its
    output, and duplicates are bounded by what was in flight when the broker died."""
    from segmentation.kafka import ensure_topics

    broker = PrivateBroker(tmp_path / "stack")
    broker.start()
    settings = make_settings(kafka_bootstrap=broker.bootstrap)
    sent: dict[str, object] = {}
    stop = threading.Event()

    def stream() -> None:
        for i in range(1000):
            if stop.is_set():
                return
            sent.update(produce_events(settings, customers(100, seed=50 + i % 5), seed=i, prefix=f"s{i}"))
            time.sleep(0.1)

    try:
        ensure_topics(settings)
        produce_events(settings, customers(600), prefix="seed")
        published(settings)
        with running_consumer(settings) as rc:
            producer = threading.Thread(target=stream)
            producer.start()
            try:
                wait_until(lambda: len(sent) >= 1000, 30, "the stream")
                broker.kill()
                time.sleep(3)
                broker.start()
                mark = len(sent)
                wait_until(lambda: len(sent) >= mark + 1000, 60, "the stream after the restart")
            finally:
                stop.set()
                producer.join(60)
            outputs = read_outputs(settings, set(sent), timeout_s=120)
            assert rc.error is None
        written = Counter(r.json()["event_id"] for r in read_topic(
            settings, settings.segments_topic, lambda rs: len(rs) >= len(sent) + 600, 30))
    finally:
        broker.stop()
        empty_redis(settings)
    assert set(sent) <= set(outputs), f"{len(set(sent) - set(outputs))} events lost"
    duplicated = sum(n - 1 for n in written.values())
    assert duplicated <= settings.batch_size, duplicated


def test_poisoned_customer_state_is_replaced_not_a_crash(settings: Settings) -> None:
    from segmentation.store import CustomerAssignment

    client = connect(settings)
    store = CustomerStore(client, settings.redis_prefix)
    client.hset(store.key("c-1"), mapping={"event_ms": "garbage", "offset": "x"})
    client.set(store.key("c-2"), b"a string where a hash belongs")
    # dated 9999: it would win over every real event, so the customer's state would never move again
    client.hset(store.key("c-3"), mapping={"event_ms": "253402300799999", "offset": "0", "segment_id": "9"})
    written = store.write_latest([CustomerAssignment(c, 1000, 5, 2, "s2", 1, "e")
                                  for c in ("c-1", "c-2", "c-3")])
    assert written == 3
    assert store.get("c-1")["segment_id"] == "2" and store.get("c-2")["event_ms"] == "1000"
    assert store.get("c-3")["segment_id"] == "2"
    later = int((time.time() + 60) * 1000)  # within the skew: a real later event, kept
    store.write_latest([CustomerAssignment("c-3", later, 6, 4, "s4", 1, "e2")])
    assert store.write_latest([CustomerAssignment("c-3", 2000, 7, 2, "s2", 1, "e3")]) == 0
    assert store.get("c-3")["segment_id"] == "4"


def test_a_model_pointer_of_the_wrong_redis_type_is_rejected_and_scoring_continues(
    settings: Settings,
) -> None:
    population = customers(600)
    produce_events(settings, population, prefix="seed")
    store = published(settings)
    with running_consumer(settings) as rc:
        read_outputs(settings, {"seed-0"})
        store.client.delete(f"{settings.redis_prefix}:current")
        store.client.hset(f"{settings.redis_prefix}:current", mapping={"not": "a version"})
        wait_until(lambda: sample(rc.metrics, "segment_bundle_rejections_total") >= 1, 15, "the rejection")
        sent = produce_events(settings, population[:100], seed=2, prefix="after")
        outputs = read_outputs(settings, set(sent))
    assert {outputs[e]["model_version"] for e in sent} == {1}
