"""Novelty and outliers in the consumer, against the training radii a bundle carries
(``quality.radius_p99``, ``quality.radius_outlier``): an outlier is still assigned, flagged in its
record, counted and never learned online; the share of recent events beyond their segment's 99th
percentile is a gauge and part of the replica state the trainer reads. A bundle without radii
flags nothing and says so. No broker: scored batches of hand-made messages."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import numpy as np
import pytest

from consumer.drift import MIN_NOVELTY_EVENTS, DriftTracker
from consumer.learner import Learner
from consumer.model import ActiveModel
from consumer.scoring import ScoredBatch, score_batch
from consumer.telemetry import Reporter
from segmentation.bundle import ModelBundle
from segmentation.metrics import ConsumerMetrics
from segmentation.readback import Readback
from segmentation.settings import Settings
from segmentation.store import Keys
from tests.support.messages import NOW_MS, SMALL_MODEL, SMALL_RULES, Msg, clipped_bundle, event, small_bundle
from tests.support.stack import sample

# The small model's segments sit at (0, 0) and (5, 5); its channel "app" adds 1 to the distance
# from the second. (0.1, 0.1) is ordinary, (2, 2) novel (beyond a p99 of 1), (20, 20) an outlier.
ORDINARY, NOVEL, FAR = (0.1, 0.1), (2.0, 2.0), (20.0, 20.0)


def radii_model(
    p99: tuple[float, float] = (1.0, 1.0), outlier: tuple[float, float] = (3.0, 3.0),
    segment_ids: tuple[int, int] = (0, 1), **clip: object,
) -> ActiveModel:
    raw = clipped_bundle(**clip) if clip else small_bundle()
    raw["quality"] = {**raw["quality"], "radius_p99": list(p99), "radius_outlier": list(outlier)}
    raw["segment_ids"] = list(segment_ids)
    return ActiveModel.of(ModelBundle.model_validate(raw))


def scored(model: ActiveModel, points: list[tuple[float, float]]) -> ScoredBatch:
    messages = [Msg(event(customer_id=f"c-{i}", event_id=f"e-{i}", features={"a": a, "b": b}), i)
                for i, (a, b) in enumerate(points)]
    return score_batch(messages, model, SMALL_RULES, NOW_MS)


def outputs(batch: ScoredBatch) -> list[dict[str, Any]]:
    return [json.loads(r.value or b"") for r in batch.outputs]


def test_an_event_beyond_its_segment_s_outlier_radius_is_still_assigned_and_flagged() -> None:
    batch = scored(radii_model(), [ORDINARY, NOVEL, FAR])
    records = outputs(batch)
    assert [r["segment_id"] for r in records] == [0, 0, 1]  # the nearest segment, as always
    assert [r["outlier"] for r in records] == [False, False, True]
    assert batch.novel.tolist() == [False, True, True]


def test_an_event_outside_the_training_envelope_is_an_outlier_however_near_its_centroid() -> None:
    # ``a`` is logged and its envelope is [-1, 1] after the log: 0.5 is inside, 5 is not.
    model = radii_model(outlier=(1e6, 1e6), clip_low=[-1.0, -1e12], clip_high=[1.0, 1e12])
    records = outputs(scored(model, [(0.5, 0.0), (5.0, 0.0)]))
    assert [r["outlier"] for r in records] == [False, True]


def test_a_bundle_without_radii_flags_nothing_and_says_so_once_per_model(
    caplog: pytest.LogCaptureFixture,
) -> None:
    batch = scored(SMALL_MODEL, [ORDINARY, NOVEL, (1e9, 1e9)])
    assert [r["outlier"] for r in outputs(batch)] == [False, False, False]
    assert not batch.novel.any() and not batch.outliers.any()
    metrics = ConsumerMetrics()
    learner = Learner(Settings().half_life_events, Settings().random_state, metrics)
    with caplog.at_level(logging.WARNING, logger="consumer.learner"):
        learner.reset(SMALL_MODEL)
        for _ in range(3):
            learner.learn(batch, scored_by=SMALL_MODEL)
    assert sum("no training radii" in r.getMessage() for r in caplog.records) == 1
    assert learner.quality is not None and learner.quality.novelty_share() is None
    assert math.isnan(metrics.registry.get_sample_value("segment_novelty_share") or 0.0)
    # the absolute bound still keeps the absurd event out of the online centres
    assert learner.online is not None and learner.online.events_seen == 3 * 2


def test_the_online_model_never_learns_from_an_outlier() -> None:
    model = radii_model()
    learner = Learner(Settings().half_life_events, Settings().random_state, ConsumerMetrics())
    learner.reset(model)
    assert learner.online is not None
    before = learner.online.centroids.copy()
    learner.learn(scored(model, [FAR] * 10), scored_by=model)
    assert np.array_equal(learner.online.centroids, before) and learner.online.events_seen == 0
    learner.learn(scored(model, [ORDINARY] * 5 + [FAR] * 5), scored_by=model)
    assert learner.online.events_seen == 5
    assert np.array_equal(learner.online.centroids[1], before[1])  # only outliers were near it


def test_outliers_and_novel_events_are_counted_by_stable_segment_id() -> None:
    model = radii_model(segment_ids=(4, 9))
    metrics = ConsumerMetrics()
    batch = scored(model, [ORDINARY, NOVEL, NOVEL, FAR])
    Reporter("r", None, None, metrics).count(batch, (), model, 0.0)  # type: ignore[arg-type]
    assert sample(metrics, "segment_outlier_events_total", segment_id="9") == 1
    assert sample(metrics, "segment_outlier_events_total", segment_id="4") == 0
    assert sample(metrics, "segment_novel_events_total", segment_id="4") == 2
    assert sample(metrics, "segment_novel_events_total", segment_id="9") == 1


def test_the_novelty_share_covers_the_recent_window_once_it_holds_enough_events() -> None:
    tracker = DriftTracker(radii_model(), window_events=1000)
    d = np.ones(100)

    def add(novel: int) -> None:
        tracker.update(np.zeros(100, dtype=np.intp), d, d * 2, np.zeros((100, 4)),
                       np.arange(100) < novel)

    for _ in range(MIN_NOVELTY_EVENTS // 100 - 1):
        add(1)
    assert tracker.novelty_share() is None  # too few events to tell 1% from 3%
    for _ in range(10):
        add(1)
    assert tracker.novelty_share() == pytest.approx(0.01)
    for _ in range(10):  # a new population: the old events age out of the window
        add(20)
    assert tracker.novelty_share() == pytest.approx(0.2)


class FakeRedis:
    """The one call the replica state makes."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}

    def set(self, key: str, value: str, ex: int) -> None:
        self.values[key] = value


class FakeStore:
    def __init__(self) -> None:
        self.client = FakeRedis()
        self.keys = Keys("t")
        self.readback = Readback()


def test_the_novelty_share_is_a_gauge_and_in_the_replica_state_the_trainer_reads() -> None:
    model = radii_model()
    metrics = ConsumerMetrics()
    learner = Learner(Settings().half_life_events, Settings().random_state, metrics)
    learner.reset(model)
    store = FakeStore()
    reporter = Reporter("r-1", None, store, metrics)  # type: ignore[arg-type]
    for _ in range(2):  # 1,000 events, 3% of them novel
        learner.learn(scored(model, [ORDINARY] * 485 + [NOVEL] * 15), scored_by=model)
    reporter.report(model, learner, set(), force=True)
    assert metrics.registry.get_sample_value("segment_novelty_share") == pytest.approx(0.03)
    (state,) = (json.loads(v) for v in store.client.values.values())
    assert state["novelty_share"] == pytest.approx(0.03) and state["model_version"] == 1
