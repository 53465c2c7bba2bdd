"""When the trainer runs (``trainer.schedule``): the decision from its signals, no Redis needed;
and an unreachable Redis means nothing is due."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from segmentation.settings import Settings
from segmentation.store import ModelStore, connect
from tests.support.stack import free_port
from trainer.__main__ import schedule_config
from trainer.schedule import COLD_RETRY_S, Schedule, Signals, highest_novelty, read_signals

SETTINGS = Settings(train_interval_s=600, drift_retrain_after_s=60, drift_retrain_threshold=0.1)
CONFIG = schedule_config(SETTINGS)
CALM = Signals(pinned=False, has_model=True, worst_drift=0.0)
DRIFTING = Signals(pinned=False, has_model=True, worst_drift=-0.2)


def published_at(t: float) -> Schedule:
    schedule = Schedule(CONFIG)
    schedule.ran("published", now=t)
    return schedule


def test_without_a_model_it_retries_every_few_seconds() -> None:
    schedule = Schedule(CONFIG)
    empty = Signals(pinned=False, has_model=False, worst_drift=0.0)
    assert schedule.decide(empty, now=1000.0) == "no model yet"
    schedule.ran("skipped", now=1000.0)
    assert schedule.decide(empty, now=1000.0 + COLD_RETRY_S / 2) is None
    assert schedule.decide(empty, now=1000.0 + COLD_RETRY_S) == "no model yet"


def test_with_a_model_it_runs_every_interval() -> None:
    schedule = published_at(0.0)
    assert schedule.decide(CALM, now=599.0) is None
    assert schedule.decide(CALM, now=600.0) == "interval"


def test_sustained_drift_retrains_early_and_a_brief_dip_does_not() -> None:
    schedule = published_at(0.0)
    assert schedule.decide(DRIFTING, now=100.0) is None  # the drift starts
    assert schedule.decide(CALM, now=130.0) is None  # and ends: the clock resets
    assert schedule.decide(DRIFTING, now=140.0) is None
    assert schedule.decide(DRIFTING, now=199.0) is None  # 59 s of drift
    assert schedule.decide(DRIFTING, now=200.0) == "sustained silhouette drift"


def test_drift_right_after_a_publish_waits_for_the_minimum_gap() -> None:
    schedule = published_at(0.0)
    schedule.drifting(-0.2, now=-500.0)  # drifting since long before the publish
    assert schedule.decide(DRIFTING, now=30.0) is None  # < drift_retrain_after_s since the run
    assert schedule.decide(DRIFTING, now=60.0) == "sustained silhouette drift"


def test_a_publish_resets_the_drift_clock() -> None:
    schedule = published_at(0.0)
    schedule.decide(DRIFTING, now=100.0)
    schedule.ran("published", now=150.0)
    assert schedule.decide(DRIFTING, now=200.0) is None  # the new model's drift starts afresh
    assert schedule.decide(DRIFTING, now=260.0) == "sustained silhouette drift"


def test_a_pin_holds_every_reason() -> None:
    schedule = Schedule(CONFIG)
    for signals in (Signals(True, False, 0.0), Signals(True, True, 0.0), Signals(True, True, -0.5)):
        assert schedule.decide(signals, now=10_000.0) is None


def test_an_unreachable_redis_makes_nothing_due() -> None:
    nowhere = SETTINGS.model_copy(update={  # nothing listens there; the service's own client
        "redis_url": f"redis://127.0.0.1:{free_port()}/0", "redis_retries": 0, "redis_timeout_s": 0.2})
    store = ModelStore(connect(nowhere), "nowhere")
    assert read_signals(store) is None
    assert Schedule(CONFIG).due(store) is None


NOVEL = Signals(pinned=False, has_model=True, worst_drift=0.0, novelty_share=0.08)
USUAL = Signals(pinned=False, has_model=True, worst_drift=0.0, novelty_share=0.012)


def test_a_sustained_novelty_share_retrains_early_and_a_brief_burst_does_not() -> None:
    schedule = published_at(0.0)
    assert schedule.decide(NOVEL, now=100.0) is None  # new customers appear
    assert schedule.decide(USUAL, now=130.0) is None  # and go: the clock resets
    assert schedule.decide(NOVEL, now=140.0) is None
    assert schedule.decide(NOVEL, now=199.0) is None  # 59 s above the share
    assert schedule.decide(NOVEL, now=200.0) == "sustained novelty"


def test_the_usual_novelty_share_never_retrains_early() -> None:
    schedule = published_at(0.0)
    at_limit = Signals(pinned=False, has_model=True, worst_drift=0.0, novelty_share=0.03)
    assert all(schedule.decide(s, now=t) is None for t in range(10, 590, 10) for s in (USUAL, at_limit))


def test_novelty_waits_for_a_pending_challenger_and_the_minimum_gap() -> None:
    schedule = published_at(0.0)
    schedule.novel(0.08, now=-500.0)  # novel since long before the publish
    assert schedule.decide(NOVEL, now=30.0) is None  # < drift_retrain_after_s since the run
    pending = Signals(pinned=False, has_model=True, worst_drift=0.0, challenger_pending=True,
                      novelty_share=0.08)
    assert schedule.decide(pending, now=90.0) is None  # the challenger is the answer
    assert schedule.decide(NOVEL, now=90.0) == "sustained novelty"


def test_a_publish_resets_the_novelty_clock_and_a_pin_holds_it() -> None:
    schedule = published_at(0.0)
    schedule.decide(NOVEL, now=100.0)
    schedule.ran("published", now=150.0)
    assert schedule.decide(NOVEL, now=200.0) is None  # the new model's share starts afresh
    assert schedule.decide(NOVEL, now=260.0) == "sustained novelty"
    pinned = Signals(pinned=True, has_model=True, worst_drift=0.0, novelty_share=0.5)
    assert schedule.decide(pinned, now=10_000.0) is None


def test_novelty_retraining_can_be_switched_off() -> None:
    schedule = Schedule(replace(CONFIG, novelty_retrain_share=None))
    schedule.ran("published", now=0.0)
    assert all(schedule.decide(NOVEL, now=t) is None for t in range(10, 590, 10))


def test_the_signal_is_the_highest_share_of_replicas_on_the_current_model() -> None:
    states: list[dict[str, Any]] = [
        {"model_version": 3, "novelty_share": 0.011}, {"model_version": 3, "novelty_share": 0.06},
        {"model_version": 2, "novelty_share": 0.9}, {"model_version": 3, "novelty_share": "0.7"},
        {"model_version": 3}]
    assert highest_novelty(states, current=3) == 0.06
    assert highest_novelty([{"model_version": 3, "novelty_share": None}], current=3) == 0.0
