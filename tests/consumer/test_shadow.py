"""A challenger scored in the shadow by the consumers (``consumer.shadow``), on the real stack:
it never reaches the output topic, its migration matrix is what its promotion then changes, and
promotion and discard under load lose nothing."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from consumer.model import ActiveModel
from segmentation.bundle import ModelBundle
from segmentation.metrics import ConsumerMetrics, TrainerMetrics
from segmentation.settings import Settings
from segmentation.store import ModelStore
from tests.support.fixed import changes_for, fixed_events, segments, send, trained
from tests.support.stack import (
    active_version,
    customers,
    produce_events,
    read_outputs,
    read_topic,
    running_consumer,
    start_service,
    wait_until,
)
from trainer.__main__ import model_topic, promotion_config
from trainer.challenger import store_challenger
from trainer.operations import discard, promote

pytestmark = pytest.mark.integration


def challenger_of(store: ModelStore, champion: ActiveModel) -> ModelBundle:
    """The champion with one segment's centre moved past another's (a refit after drift may do
    that), under a fresh version trained against the champion."""
    centroids = champion.centroids.copy()
    centroids[0] = 2 * centroids[1] - centroids[0]
    return champion.bundle.model_copy(update={
        "version": store.allocate_version(), "centroids": centroids.tolist(),
        "previous_version": champion.version})


def migrations(metrics: ConsumerMetrics) -> Counter[tuple[int, int]]:
    """The migration matrix as the consumer exports it: (champion id, challenger id) -> events."""
    matrix: Counter[tuple[int, int]] = Counter()
    for family in metrics.registry.collect():
        for s in family.samples:
            if s.name == "segment_challenger_migrations_total" and s.value:
                matrix[(int(s.labels["from_segment_id"]), int(s.labels["to_segment_id"]))] += int(s.value)
    return matrix


def test_the_migration_matrix_of_a_challenger_is_the_changes_its_promotion_makes(settings: Settings) -> None:
    store, champion = trained(settings)
    challenger = challenger_of(store, champion)
    people = customers(400, seed=21, prefix="f")
    who = {c.customer_id for c in people}
    with running_consumer(settings) as rc:
        send(settings, fixed_events(people, "first"))
        store_challenger(model_topic(settings), store, challenger)
        wait_until(lambda: rc.loop.watcher.challenger is not None, 30, "the consumer to see the challenger")
        shadow = fixed_events(people, "shadow")
        outputs = send(settings, shadow)
        wait_until(lambda: rc.loop.shadow.events >= len(people), 30, "every shadow event counted")
        matrix = migrations(rc.metrics)
        agreement = rc.metrics.registry.get_sample_value("segment_challenger_agreement_ratio")
        promote(promotion_config(settings), store, TrainerMetrics())
        wait_until(lambda: active_version(rc) == challenger.version, 30, "the promoted model in use")
        send(settings, fixed_events(people, "after"))

    # the challenger never leaked into the output topic while it was one
    assert {o["model_version"] for o in outputs.values()} == {champion.version}
    # the matrix is the challenger's assignment of exactly these events
    expected = Counter(zip(segments(champion, shadow).values(),
                           segments(ActiveModel.of(challenger), shadow).values(), strict=True))
    assert matrix == expected
    moves = {pair: n for pair, n in matrix.items() if pair[0] != pair[1]}
    assert moves, "the challenger must move some customers"
    assert agreement == pytest.approx(1 - sum(moves.values()) / len(people))

    # ... and the changes observed after its promotion are its off-diagonal, all caused by the model
    later = [r for r in changes_for(settings, who, at_least=len(people) + sum(moves.values()))
             if r["cause"] != "initial"]
    assert Counter(r["cause"] for r in later) == {"model": sum(moves.values())}
    assert Counter((int(str(r["from_segment_id"])), int(str(r["to_segment_id"]))) for r in later) == moves


def test_promotion_and_discard_under_load_lose_nothing_and_leak_nothing(
    settings: Settings, tmp_path: Path,
) -> None:
    store, champion = trained(settings)
    discarded = challenger_of(store, champion)
    log = tmp_path / "consumer.log"
    proc = start_service(settings, "consumer", log)
    sent: dict[str, object] = {}
    stop = threading.Event()

    def produce() -> None:
        for round_ in range(200):
            if stop.is_set():
                return
            sent.update(produce_events(settings, customers(100, seed=round_), seed=round_,
                                       prefix=f"load{round_}"))

    producer = threading.Thread(target=produce, daemon=True)
    try:
        producer.start()
        wait_until(lambda: len(sent) > 1000, 60, "load")
        store_challenger(model_topic(settings), store, discarded)
        wait_until(lambda: len(sent) > 3000, 60, "more load")
        assert discard(model_topic(settings), store, TrainerMetrics())["discarded"] == discarded.version
        promoted = challenger_of(store, champion)
        store_challenger(model_topic(settings), store, promoted)
        wait_until(lambda: len(sent) > 5000, 60, "more load")
        promote(promotion_config(settings), store, TrainerMetrics())
        wait_until(lambda: len(sent) > 8000, 90, "load after the promotion")
        stop.set()
        producer.join(60)
        outputs = read_outputs(settings, set(sent), timeout_s=120)
    finally:
        stop.set()
        proc.terminate()
        proc.wait(20)
    assert set(sent) <= set(outputs), f"lost {len(set(sent) - set(outputs))}; {log.read_text()[-1500:]}"
    versions = Counter(int(str(o["model_version"])) for o in outputs.values())
    assert set(versions) == {champion.version, promoted.version}, versions  # never the discarded one
    # per partition, the versions only go forward: the swap happened once, between two batches
    records = read_topic(settings, settings.segments_topic, lambda rs: len(rs) >= len(outputs), 60)
    by_partition: dict[int, list[int]] = {}
    for r in records:
        by_partition.setdefault(r.partition, []).append(int(r.json()["model_version"]))
    assert all(np.all(np.diff(v) >= 0) for v in by_partition.values())


def test_trainer_run_promotes_a_challenger_on_what_real_consumers_report(
    settings: Settings, tmp_path: Path,
) -> None:
    store, champion = trained(settings)
    # a refit that barely moved: it agrees with the champion on (nearly) every event
    centroids = champion.centroids + 0.01
    challenger = champion.bundle.model_copy(update={
        "version": store.allocate_version(), "centroids": centroids.tolist(),
        "previous_version": champion.version})
    people = customers(300, seed=22, prefix="f")
    # SEG_MIN_ROWS out of reach: scheduled retrains skip, only the rule can change the model
    trainer = start_service(settings, "trainer run", tmp_path / "trainer.log",
                            SEG_CHALLENGER_PROMOTE_AFTER="500", SEG_MIN_ROWS="10000000")
    try:
        with running_consumer(settings) as rc:
            store_challenger(model_topic(settings), store, challenger)
            wait_until(lambda: rc.loop.watcher.challenger is not None, 30, "the challenger seen")
            send(settings, fixed_events(people, "one"))
            assert store.current_version() == champion.version  # 300 events: not enough
            send(settings, fixed_events(people, "two"))
            wait_until(lambda: active_version(rc) == challenger.version, 60,
                       "the trainer to promote the challenger on the consumer's report")
            after = send(settings, fixed_events(people, "three"))
    finally:
        trainer.terminate()
        trainer.wait(30)
    assert store.current_version() == challenger.version and store.challenger() is None
    assert {o["model_version"] for o in after.values()} == {challenger.version}
    assert "promoting the challenger automatically" in (tmp_path / "trainer.log").read_text()
