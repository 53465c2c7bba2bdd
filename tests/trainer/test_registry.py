"""Segment ids survive losing Redis: the models topic is the record of truth, Redis a cache that
rebuilds itself from it. Real broker, real Redis servers (private ones where a test kills them)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import KafkaException

from demo.generator import Customer, event_value
from segmentation.bundle import ModelBundle
from segmentation.cluster_metrics import nearest_two
from segmentation.events import CustomerEvent
from segmentation.features import FeatureConfig
from segmentation.kafka import delete_topics, ensure_topics
from segmentation.metrics import TrainerMetrics
from segmentation.model_log import ModelLog, read_registry, sync_store
from segmentation.settings import Settings
from segmentation.store import ModelStore, TrainerState, connect
from tests.support.stack import (
    active_version,
    customers,
    empty_redis,
    free_port,
    produce_events,
    read_outputs,
    running_consumer,
    sample,
    start_redis,
    wait_until,
)
from trainer.__main__ import model_topic, train_config
from trainer.operations import pin, rollback
from trainer.pipeline import train_once

pytestmark = pytest.mark.integration  # every test here runs against the local stack


def segments_of(bundle: ModelBundle, population: list[Customer]) -> dict[int, tuple[int, str]]:
    """Each true population -> the (segment id, name) most of its customers are assigned."""
    rng = np.random.default_rng(99)
    events = [CustomerEvent.model_validate(event_value(c, rng, f"probe-{i}"))
              for i, c in enumerate(population)]
    index, _, _ = nearest_two(bundle.features.encode(events)[0], bundle.centroid_array())
    votes: dict[int, Counter[int]] = {}
    for customer, i in zip(population, index.tolist(), strict=True):
        votes.setdefault(customer.segment, Counter())[i] += 1
    return {truth: (bundle.segment_ids[c.most_common(1)[0][0]], bundle.segment_names[c.most_common(1)[0][0]])
            for truth, c in votes.items()}


def test_emptying_redis_keeps_every_population_s_segment_id_and_name_and_the_next_version_is_v2(
    settings: Settings, store: ModelStore
) -> None:
    """Regression: a second run once published v1 again with new ids."""
    population = customers(2000)
    produce_events(settings, population, seed=1)
    first = train_once(train_config(settings), store, TrainerMetrics())
    assert first.result == "published" and first.version == 1
    before = segments_of(store.load(1), population)

    empty_redis(settings)
    produce_events(settings, population, seed=2, prefix="later")
    second = train_once(train_config(settings), store, TrainerMetrics())

    assert second.result == "published" and second.version == 2, second.detail
    assert segments_of(store.load(2), population) == before
    assert store.current_version() == 2 and store.versions() == [1, 2]
    assert store.allocate_segment_ids(1) == [5]  # ids 0..4 are taken for good


def test_a_trainer_against_an_empty_redis_continues_the_version_and_id_sequences(
    settings: Settings, store: ModelStore
) -> None:
    produce_events(settings, customers(1500), seed=1)
    assert train_once(train_config(settings), store, TrainerMetrics()).version == 1
    assert train_once(train_config(settings), store, TrainerMetrics(), force=True).version == 2
    empty_redis(settings)
    assert sync_store(settings, store)
    assert store.current_version() == 2
    assert store.allocate_version() == 3
    taken = {sid for v in (1, 2) for sid in store.load(v).segment_ids}
    assert min(store.allocate_segment_ids(3)) > max(taken)


def test_a_consumer_started_against_an_empty_redis_scores_at_once(
    settings: Settings, store: ModelStore
) -> None:
    population = customers(600)
    produce_events(settings, population, prefix="seed")
    assert train_once(train_config(settings), store, TrainerMetrics()).version == 1
    empty_redis(settings)
    started = time.monotonic()
    with running_consumer(settings) as rc:
        sent = produce_events(settings, population[:100], seed=2, prefix="after")
        outputs = read_outputs(settings, set(sent), timeout_s=30)
        took = time.monotonic() - started
        assert rc.loop.watcher.active is not None and rc.loop.watcher.active.version == 1
    assert {outputs[e]["model_version"] for e in sent} == {1}
    assert took < 30  # bounded by read_outputs; the speed itself is measured by make chaos
    assert store.current_version() == 1  # the cache was rebuilt


def test_a_pin_survives_losing_redis(settings: Settings, store: ModelStore) -> None:
    produce_events(settings, customers(1500), seed=1)
    train_once(train_config(settings), store, TrainerMetrics())
    train_once(train_config(settings), store, TrainerMetrics(), force=True)
    version = rollback(model_topic(settings), FeatureConfig.of(settings), store, 1)
    empty_redis(settings)
    sync_store(settings, store)
    assert TrainerState.of(store).pinned() == version and store.current_version() == version
    pin(model_topic(settings), store, None)
    empty_redis(settings)
    sync_store(settings, store)
    assert TrainerState.of(store).pinned() is None


def test_an_older_redis_snapshot_is_brought_forward_and_never_moves_a_version_back(
    settings: Settings, store: ModelStore
) -> None:
    produce_events(settings, customers(1500), seed=1)
    train_once(train_config(settings), store, TrainerMetrics())
    client = connect(settings)
    snapshot = {k: client.dump(k) for k in client.scan_iter(f"{settings.redis_prefix}:*")}
    train_once(train_config(settings), store, TrainerMetrics(), force=True)
    empty_redis(settings)
    for key, value in snapshot.items():
        client.restore(key, 0, value or b"")
    assert store.current_version() == 1  # Redis went back in time
    assert sync_store(settings, store)
    assert store.current_version() == 2 and store.allocate_version() == 3


def test_a_poisoned_record_on_the_models_topic_is_skipped_never_used(
    settings: Settings, store: ModelStore
) -> None:
    produce_events(settings, customers(1500), seed=1)
    train_once(train_config(settings), store, TrainerMetrics())
    ModelLog(settings).append([("v9", b'{"version": 9, "garbage": true}'), ("v7", b"\xff")])
    registry = read_registry(settings)
    assert set(registry.bundles) == {1} and registry.invalid_records == 2
    empty_redis(settings)
    sync_store(settings, store)
    assert store.current_version() == 1 and store.allocate_version() == 2


@pytest.mark.system  # kills a private Redis: the system tier (make system)
def test_redis_killed_and_restarted_empty_mid_stream_loses_nothing_and_keeps_ids(
    settings_factory: Callable[..., Settings], tmp_path: Path
) -> None:
    """Two consumers score a steady stream; the Redis server is killed and restarted empty; no
    consumer pauses, nothing is lost, and the next retrain keeps every population's id and name
    and publishes the next version, which the consumers pick up."""
    port = free_port()
    settings = settings_factory(redis_url=f"redis://127.0.0.1:{port}/0", redis_timeout_s=0.3)
    population = customers(1500)
    server = start_redis(tmp_path, port)
    sent: dict[str, Customer] = {}
    stop = threading.Event()

    def stream() -> None:
        for i in range(1000):
            if stop.is_set():
                return
            sent.update(produce_events(settings, population[:150], seed=10 + i, prefix=f"s{i}"))
            time.sleep(0.2)

    try:
        store = ModelStore(connect(settings), settings.redis_prefix)
        produce_events(settings, population, seed=1, prefix="seed")
        assert train_once(train_config(settings), store, TrainerMetrics()).version == 1
        before = segments_of(store.load(1), population)
        paused_seen = []
        replica_b = settings.model_copy(update={"replica_id": settings.replica_id + "-b"})
        with running_consumer(settings) as first, running_consumer(replica_b) as second:
            producer = threading.Thread(target=stream)
            producer.start()
            try:
                wait_until(lambda: len(sent) > 1000, 30, "the stream")
                server.kill()
                server.wait(10)
                wait_until(lambda: sum(sample(rc.metrics, "segment_redis_errors_total",
                                              operation="customer_write") for rc in (first, second)) > 0,
                           30, "the replicas meeting the outage")
                server = start_redis(tmp_path, port)  # empty: no persistence
                for _ in range(20):
                    paused_seen.append(first.loop.paused or second.loop.paused)
                    time.sleep(0.25)
                retrain = train_once(train_config(settings), store, TrainerMetrics())
                wait_until(lambda: active_version(first) == active_version(second) == 2, 20,
                           "both replicas on v2")
            finally:
                stop.set()
                producer.join(30)
            outputs = read_outputs(settings, set(sent), timeout_s=90)

        assert set(sent) <= set(outputs), f"{len(set(sent) - set(outputs))} events lost"
        assert retrain.result == "published" and retrain.version == 2, retrain.detail
        assert segments_of(store.load(2), population) == before
        assert not any(paused_seen)
    finally:
        server.kill()
        server.wait(10)


def test_a_lost_models_topic_is_backfilled_from_redis_before_redis_can_be_lost_too(
    settings: Settings, store: ModelStore
) -> None:
    produce_events(settings, customers(1500), seed=1)
    train_once(train_config(settings), store, TrainerMetrics())
    train_once(train_config(settings), store, TrainerMetrics(), force=True)
    delete_topics(settings, [settings.models_topic])
    wait_until(lambda: _recreated(settings), 30, "the models topic recreated")
    assert sync_store(settings, store)  # what the trainer's catch-up does every few seconds
    registry = read_registry(settings)
    assert set(registry.bundles) == {1, 2} and registry.current == 2
    empty_redis(settings)
    sync_store(settings, store)
    assert store.current_version() == 2 and store.allocate_version() == 3


def _recreated(settings: Settings) -> bool:
    try:
        ensure_topics(settings)
        return True
    except KafkaException:
        return False


def test_a_consumer_started_while_redis_is_unreachable_scores_with_the_model_from_the_topic(
    settings: Settings, store: ModelStore
) -> None:
    population = customers(600)
    produce_events(settings, population, prefix="seed")
    assert train_once(train_config(settings), store, TrainerMetrics()).version == 1
    no_redis = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0",
                                           "redis_timeout_s": 0.2, "redis_retries": 0})
    with running_consumer(no_redis) as rc:
        sent = produce_events(settings, population[:100], seed=2, prefix="after")
        outputs = read_outputs(settings, set(sent), timeout_s=30)
        assert rc.loop.watcher.active is not None and rc.loop.watcher.active.version == 1
    assert {outputs[e]["model_version"] for e in sent} == {1}
