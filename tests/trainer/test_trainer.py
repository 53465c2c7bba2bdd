"""The trainer on the real broker and Redis: the quality gate, the stable segment registry,
concurrent and crashing trainers, the operator commands and the report.

Each scenario builds the data that triggers its case from behavioural profiles
(``demo.generator.Profile``) with chosen sizes, produced to the test's topic as real events.
Most profiles here use one channel each: with mixed channels, the (unweighted) one-hot channel
columns split a profile in two, and K selection finds 7 segments in the 5 demo profiles, which
would blur the K-chosen cases below.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient

from demo.generator import PROFILES, Customer, Profile, make_customers
from segmentation.bundle import Lineage, ModelBundle, Quality
from segmentation.cluster_metrics import nearest_two
from segmentation.events import Event
from segmentation.features import FeatureSpec
from segmentation.metrics import TrainerMetrics
from segmentation.model_log import sync_store
from segmentation.settings import Settings
from segmentation.store import ModelStore, ReplicaStates, TrainerState, connect
from segmentation.store.trainer_state import UNREADABLE_PIN
from tests.support.stack import (
    Received,
    customers,
    free_port,
    produce_events,
    produce_raw,
    read_topic,
    running_consumer,
    sample,
    settings_env,
    start_redis,
    wait_until,
)
from trainer.__main__ import reproduce_config, schedule_config, train_config, window_config
from trainer.html_report import write_report
from trainer.operations import reproduce
from trainer.pipeline import RunResult, train_once
from trainer.schedule import Schedule
from trainer.window import read_window

pytestmark = pytest.mark.integration  # every test here runs against the local stack

ONE_CHANNEL = tuple(Profile(p.name, p.means, ((p.channels[0][0], 1.0),)) for p in PROFILES)
CHAMPIONS, LOYAL, NEWCOMERS, AT_RISK, BARGAIN = ONE_CHANNEL
BIG_BASKETS = Profile("big-basket weekenders", (30, 4, 2600, 320, 5, 400), (("web", 1.0),))


# --- helpers ---------------------------------------------------------------------------------
def population(groups: Sequence[tuple[Profile, int]], seed: int = 1, prefix: str = "c") -> list[Customer]:
    """Customers with a chosen count per profile, ids ``prefix-0..`` in order (so a second
    population with the same sizes is the same customers, behaving differently);
    ``Customer.segment`` is the group's index."""
    rng = np.random.default_rng(seed)
    out: list[Customer] = []
    for group, (profile, n) in enumerate(groups):
        for c in make_customers(n, rng, profiles=(profile,)):
            out.append(Customer(f"{prefix}-{len(out)}", group, c.centre, c.channel))
    return out


def store_for(settings: Settings) -> ModelStore:
    return ModelStore(connect(settings), settings.redis_prefix)


def published(settings: Settings, store: ModelStore, metrics: TrainerMetrics, **kwargs: Any) -> ModelBundle:
    result = train_once(train_config(settings), store, metrics, **kwargs)
    assert result.result == "published", result.detail
    assert result.bundle is not None
    return result.bundle


def segment_ids(bundle: ModelBundle, events: Sequence[Event]) -> np.ndarray:
    """The segment id ``bundle`` gives each event (as the consumer computes it)."""
    x, _ = bundle.features.encode(events)
    index, _, _ = nearest_two(x, bundle.centroid_array())
    return np.asarray(bundle.segment_ids)[index]


def latest_events(settings: Settings, people: Sequence[Customer]) -> list[Event]:
    """The latest event of each of ``people`` in the topic, in ``people`` order."""
    by_id = {e.customer_id: e for e in read_window(window_config(settings)).events}
    return [by_id[c.customer_id] for c in people]


def segment_of_group(bundle: ModelBundle, events: Sequence[Event], people: Sequence[Customer],
                     group: int) -> int:
    ids = segment_ids(bundle, events)
    mine = Counter(int(s) for s, c in zip(ids, people, strict=True) if c.segment == group)
    return mine.most_common(1)[0][0]


def refusals(metrics: TrainerMetrics, check: str) -> float:
    value = metrics.registry.get_sample_value("segment_trainer_gate_refusals_total", {"check": check})
    return value or 0.0


def assert_refused(result: RunResult, check: str, store: ModelStore, current: int,
                   metrics: TrainerMetrics) -> None:
    """Refused by exactly ``check``; the current model stays; the refusal is recorded and counted."""
    assert result.result == "rejected", f"{result.result}: {result.detail}"
    assert [f.check for f in result.failures] == [check], result.detail
    assert store.current_version() == current
    assert store.load(current).version == current
    run = TrainerState.of(store).runs()[0]
    assert run["result"] == "rejected" and [f["check"] for f in run["failures"]] == [check]
    assert run["detail"] == result.detail
    assert refusals(metrics, check) == 1
    assert metrics.registry.get_sample_value("segment_trainer_runs_total", {"result": "rejected"}) == 1


def trainer_cli(settings: Settings, *args: str, timeout_s: float = 180) -> subprocess.CompletedProcess[str]:
    """``python -m trainer ARGS`` as an operator runs it, configured through SEG_* variables."""
    return subprocess.run(
        [sys.executable, "-m", "trainer", *args], env=settings_env(settings), capture_output=True,
        text=True, timeout=timeout_s,
    )


def bundle_keys(store: ModelStore) -> list[int]:
    return sorted(int(k.decode().rsplit(":", 1)[1])
                  for k in store.client.scan_iter(match=store.keys.bundle("*")))


# The gate's later checks (absolute floors, spread separation, memory of the
# last accepted model), switched off where a test proves that one older check alone refuses.
NEWER_CHECKS_OFF: dict[str, Any] = {
    "gate_min_spread_separation": None, "gate_min_silhouette": None, "gate_max_davies_bouldin": None,
    "gate_max_silhouette_drop": None, "gate_max_davies_bouldin_rise": None,
    "gate_max_structural_share": None,
}


def champions_jump(c: Customer) -> np.ndarray | None:
    """Champions triple their basket and quadruple their spend: far beyond any threshold."""
    return np.array([1.0, 1.0, 4.0, 3.0, 1.0, 1.0]) if c.segment == 0 else None


# --- the quality gate --------------------------------------------------------------------------
def test_a_segment_below_the_share_floor_is_refused_and_force_publishes_it_marked_forced(
    settings: Settings, store: ModelStore, trainer_metrics: TrainerMetrics
) -> None:
    produce_events(settings, population([(p, 200) for p in ONE_CHANNEL]))
    first = published(settings, store, trainer_metrics)
    # The same 1000 customers later: 'at risk' has almost emptied, 8 customers are left in it
    # (inside the training envelope: a handful of rows beyond it would be left out of the fit).
    drained = population([(CHAMPIONS, 248), (LOYAL, 248), (NEWCOMERS, 248), (BARGAIN, 248),
                          (AT_RISK, 8)], seed=2)
    produce_events(settings, drained, seed=2, prefix="d")

    result = train_once(train_config(settings), store, trainer_metrics)

    assert_refused(result, "min_share", store, first.version, trainer_metrics)
    assert result.failures[0].value == pytest.approx(8 / 1000)
    assert "floor 1.00%" in result.detail

    forced = trainer_cli(settings, "once", "--force")
    assert forced.returncode == 0, forced.stderr
    assert json.loads(forced.stdout)["result"] == "published"
    bundle = store.load_current()
    assert bundle is not None and bundle.version == json.loads(forced.stdout)["version"]
    assert bundle.forced and bundle.previous_version == first.version
    assert bundle.quality.gate["passed"] is False
    assert bundle.quality.gate["min_share"] == pytest.approx(8 / 1000)
    assert min(bundle.quality.shares) < 0.01
    run = TrainerState.of(store).runs()[0]
    assert run["result"] == "published" and run["forced"] is True
    assert [f["check"] for f in run["failures"]] == ["min_share"]

    history = trainer_cli(settings, "history", "--json")
    assert history.returncode == 0, history.stderr
    listed = json.loads(history.stdout)
    assert [(v["version"], v["forced"]) for v in listed["versions"]] == [(1, False), (bundle.version, True)]
    assert listed["recent_refusals"][0]["failures"][0]["check"] == "min_share"


def pulled(profiles: Sequence[Profile], pull: float) -> tuple[Profile, ...]:
    """``profiles`` with their centres pulled towards their mean: the same segments, collapsed."""
    means = np.array([p.means for p in profiles], dtype=np.float64)
    centre = means.mean(axis=0)
    return tuple(Profile(p.name, tuple((centre + pull * (m - centre)).tolist()), p.channels)
                 for p, m in zip(profiles, means, strict=True))


def test_force_keeps_the_accepted_baseline_and_accept_moves_it(
    settings_factory: Callable[..., Settings], trainer_metrics: TrainerMetrics
) -> None:
    """Only the memory of the last accepted model judges here (floors and the same-window
    comparison off). A forced collapse leaves the baseline where it was, so the next refit of
    the same data is refused again; `--accept` (the customer base really changed) makes the
    model the baseline, and the next refit of the same data publishes."""
    settings = settings_factory(gate_silhouette_margin=1.0, gate_min_spread_separation=None,
                                gate_min_silhouette=None, gate_max_davies_bouldin=None,
                                gate_min_separation=0.0)
    store = store_for(settings)
    produce_events(settings, population([(p, 200) for p in ONE_CHANNEL]))
    first = published(settings, store, trainer_metrics)
    produce_events(settings, population([(p, 200) for p in pulled(ONE_CHANNEL, 0.3)], seed=2), seed=2)

    assert train_once(train_config(settings), store, trainer_metrics).result == "rejected"
    assert train_once(train_config(settings), store, trainer_metrics, force=True).result == "published"
    forced = store.load_current()
    assert forced is not None and forced.forced and forced.quality.gate["baseline_version"] == first.version
    again = train_once(train_config(settings), store, trainer_metrics)
    assert again.result == "rejected" and "silhouette_drop" in [f.check for f in again.failures]

    accepted = trainer_cli(settings, "once", "--accept")
    assert accepted.returncode == 0, accepted.stderr
    bundle = store.load_current()
    assert bundle is not None and bundle.version == json.loads(accepted.stdout)["version"]
    assert bundle.forced and bundle.quality.gate["operator_accepted"] is True
    assert bundle.quality.gate["baseline_version"] == bundle.version
    shown = json.loads(trainer_cli(settings, "show", "--json").stdout)
    assert shown["gate"]["operator_accepted"] is True
    assert shown["gate"]["baseline"]["accepted_version"] == bundle.version
    assert published(settings, store, trainer_metrics).version > bundle.version


def test_two_near_identical_centroids_are_refused(
    settings_factory: Callable[..., Settings], trainer_metrics: TrainerMetrics
) -> None:
    # This model also scores worse than the current one on the same window and than the last
    # accepted model on its own, and two of its segments are one population cut in two
    # (tests/trainer/test_quality_gate.py); those checks are switched off so that the refusal is
    # provably the separation check's alone.
    settings = settings_factory(gate_silhouette_margin=1.0, **NEWER_CHECKS_OFF)
    store = store_for(settings)
    produce_events(settings, population([(p, 200) for p in ONE_CHANNEL]))
    first = published(settings, store, trainer_metrics)
    # Loyal regulars now behave exactly like champions: two segments became indistinguishable,
    # and a fixed K=5 has to cut the merged group in two.
    merged = population([(CHAMPIONS, 200), (CHAMPIONS, 200), (NEWCOMERS, 200), (AT_RISK, 200),
                         (BARGAIN, 200)], seed=3)
    produce_events(settings, merged, seed=3, prefix="m")

    result = train_once(train_config(settings), store, trainer_metrics)

    assert_refused(result, "separation", store, first.version, trainer_metrics)
    failure = result.failures[0]
    assert failure.value < failure.limit == settings.gate_min_separation


def test_the_same_window_comparison_is_made_at_equal_k_and_a_merge_is_a_structural_change(
    settings: Settings, store: ModelStore, trainer_metrics: TrainerMetrics
) -> None:
    people = population([(p, 200) for p in ONE_CHANNEL])
    produce_events(settings, people, seed=1)
    first = published(settings, store, trainer_metrics)
    produce_events(settings, people, seed=2, prefix="f")  # same behaviour, fresh events
    # K set one too low, so two real segments are merged. The silhouette of partitions with
    # different K says nothing about which is better (it favours fewer segments), so the
    # same-window comparison is not made; the merge moves two fifths of the customers to a new
    # id, which the structure check refuses without an accept.
    result = train_once(train_config(settings.model_copy(update={"k": 4})), store, trainer_metrics)

    assert result.result == "rejected", result.detail
    checks = {f.check for f in result.failures}
    assert "silhouette" not in checks and "structure" in checks, result.detail
    assert store.current_version() == first.version


def produce_absurd_spenders(settings: Settings, n: int = 3) -> None:
    absurd = {"recency_days": 3, "frequency_90d": 14, "monetary_90d": 1e308, "avg_basket_value": 58.0,
              "sessions_30d": 22, "tenure_days": 730}
    produce_raw(settings, [(f"bot-{i}", json.dumps({
        "customer_id": f"bot-{i}", "event_time": int(time.time() * 1000), "features": absurd,
        "attributes": {"channel": "web"}}).encode()) for i in range(n)])


def test_a_few_absurd_spenders_are_clipped_and_the_retrain_publishes(
    settings_factory: Callable[..., Settings], trainer_metrics: TrainerMetrics
) -> None:
    """Three customers of 803 spending 1e308 (bounds opened to the largest float): clipped at
    the window's widened quantiles, they neither overflow the scaler nor take a segment."""
    settings = settings_factory(feature_bounds={"monetary_90d": [-1.7e308, 1.7e308]})
    store = ModelStore(connect(settings), settings.redis_prefix)
    produce_events(settings, customers(800))
    first = published(settings, store, trainer_metrics)
    produce_absurd_spenders(settings)
    bundle = published(settings, store, trainer_metrics)
    assert bundle.features.clip_high is not None and max(bundle.features.clip_high) < 1e4
    assert sorted(bundle.segment_ids) == sorted(first.segment_ids) and min(bundle.quality.sizes) > 100


def test_a_window_that_overflows_the_scaler_is_refused_as_non_finite_even_when_forced(
    settings_factory: Callable[..., Settings], trainer_metrics: TrainerMetrics
) -> None:
    # Bounds opened to the largest float and clipping off, so that absurd but finite spends of
    # 1e308 reach the scaler: they overflow its mean, and every scaled row becomes NaN.
    # Spend declared a plain feature and never logged (the log of money would tame 1e308).
    settings = settings_factory(feature_bounds={"monetary_90d": [-1.7e308, 1.7e308]}, clip_quantile=0.0,
                                feature_kinds={"monetary_90d": "other"}, log_skewness=None)
    store = ModelStore(connect(settings), settings.redis_prefix)
    produce_events(settings, customers(800))
    first = published(settings, store, trainer_metrics)
    produce_absurd_spenders(settings)

    for force in (False, True):
        result = train_once(train_config(settings), store, trainer_metrics, force=force)
        assert result.result == "rejected" and [f.check for f in result.failures] == ["finite"]
    assert "cannot be forced" in result.detail
    assert store.current_version() == first.version
    assert refusals(trainer_metrics, "finite") == 2
    assert [r["result"] for r in TrainerState.of(store).runs()[:2]] == ["rejected", "rejected"]


def test_out_of_range_values_are_skipped_by_the_window_with_default_bounds(
    settings: Settings, store: ModelStore, trainer_metrics: TrainerMetrics
) -> None:
    produce_events(settings, customers(800))
    produce_absurd_spenders(settings)
    result = train_once(train_config(settings), store, trainer_metrics)
    assert result.result == "published", result.detail
    assert result.bundle is not None and result.bundle.lineage.rows_invalid == 3
    assert sample(trainer_metrics, "segment_trainer_window_rows", kind="invalid") == 3


# --- the stable segment registry -------------------------------------------------------------------
def test_five_consecutive_retrains_on_a_stationary_stream_keep_customers_on_their_segment_ids(
    settings: Settings, store: ModelStore, trainer_metrics: TrainerMetrics
) -> None:
    people = customers(1500)  # the demo profiles, mixed channels, the default fixed K=5
    bundles = []
    for round_ in range(6):  # a first fit, then five retrains
        produce_events(settings, people, seed=round_, prefix=f"r{round_}")
        bundles.append(published(settings, store, trainer_metrics))

    for bundle in bundles[1:]:
        m = bundle.label_mapping
        assert len(m.matched) == 5 and not m.new and not m.retired, m
        assert sorted(bundle.segment_ids) == [0, 1, 2, 3, 4]
    events = latest_events(settings, people)
    ids = [segment_ids(b, events) for b in bundles]
    for before, after in zip(ids, ids[1:], strict=False):
        assert (before == after).mean() >= 0.995
    assert (ids[0] == ids[-1]).mean() >= 0.995


def test_a_cluster_that_moves_within_the_threshold_keeps_its_id_and_one_that_jumps_gets_a_new_one(
    settings: Settings, store: ModelStore, trainer_metrics: TrainerMetrics
) -> None:
    people = customers(1000)
    produce_events(settings, people, seed=1)
    first = published(settings, store, trainer_metrics)
    champions = segment_of_group(first, latest_events(settings, people), people, 0)

    # Champions spend a third more, with bigger baskets: the cluster moves, within the threshold.
    produce_events(settings, people, seed=2, prefix="m",
                   shift=lambda c: np.array([1.0, 1.0, 1.35, 1.2, 1.0, 1.0]) if c.segment == 0 else None)
    moved = published(settings, store, trainer_metrics)
    m = moved.label_mapping
    assert not m.new and not m.retired
    distance = {c.segment_id: c.distance or 0.0 for c in m.matched}
    assert m.threshold is not None
    others = [d for sid, d in distance.items() if sid != champions]
    assert 3 * max(others) < distance[champions] < m.threshold  # it did move, and kept its id
    events = latest_events(settings, people)
    assert segment_of_group(moved, events, people, 0) == champions
    assert (segment_ids(first, events) == segment_ids(moved, events)).mean() >= 0.995

    # Then they jump: far beyond the threshold, the cluster is another segment (a population
    # replaced: a structural change moving a fifth of the customers, so the operator accepts it).
    produce_events(settings, people, seed=3, prefix="j", shift=champions_jump)
    refused = train_once(train_config(settings), store, trainer_metrics)
    assert refused.result == "rejected" and [f.check for f in refused.failures] == ["structure"]
    jumped = published(settings, store, trainer_metrics, accept=True)
    m = jumped.label_mapping
    assert [c.segment_id for c in m.retired] == [champions]
    assert [c.segment_id for c in m.new] == [5]  # fresh from the counter, never a reused id
    assert sorted(c.segment_id for c in m.matched) == sorted(set(first.segment_ids) - {champions})
    events = latest_events(settings, people)
    assert segment_of_group(jumped, events, people, 0) == 5
    rest = np.array([c.segment != 0 for c in people])
    assert (segment_ids(moved, events)[rest] == segment_ids(jumped, events)[rest]).mean() >= 0.995

    # The mapping is also on the compacted audit topic, with the bundle it belongs to.
    def audited(rs: list[Received]) -> bool:
        return any(r.key == b"v3" for r in rs)

    record = next(r for r in read_topic(settings, settings.models_topic, audited, 30) if r.key == b"v3")
    mapping = record.json()["label_mapping"]
    assert [c["segment_id"] for c in mapping["retired"]] == [champions]
    assert [c["segment_id"] for c in mapping["new"]] == [5]
    assert all(c["distance"] < mapping["threshold"] for c in mapping["matched"])


def test_a_new_cluster_gets_a_fresh_id_named_by_default_and_leaves_the_others_unchanged(
    settings_factory: Callable[..., Settings], trainer_metrics: TrainerMetrics, tmp_path: Path
) -> None:
    names = {str(i): name for i, name in enumerate(["Alpha", "Bravo", "Charlie", "Delta", "Echo"])}
    (tmp_path / "names.json").write_text(json.dumps(names))
    # K chosen, not fixed: with a fixed K a sixth cluster could only enter by merging two others.
    settings = settings_factory(k=None, k_max=8, names_file=str(tmp_path / "names.json"))
    store = store_for(settings)
    people = population([(p, 200) for p in ONE_CHANNEL])
    produce_events(settings, people)
    first = published(settings, store, trainer_metrics)
    assert first.k == 5 and first.segment_names == ["Alpha", "Bravo", "Charlie", "Delta", "Echo"]

    newcomers = population([(BIG_BASKETS, 200)], seed=7, prefix="n")
    produce_events(settings, newcomers, seed=7, prefix="n")
    # a birth of a sixth of the customers: a structural change the operator accepts
    grown = published(settings, store, trainer_metrics, accept=True)

    m = grown.label_mapping
    assert grown.k == 6 and "silhouette" in grown.quality.k_selection
    assert [d.status for d in m.diff if d.segment_id == 5] == ["born"]
    assert [c.segment_id for c in m.new] == [5] and not m.retired
    assert sorted(c.segment_id for c in m.matched) == [0, 1, 2, 3, 4]
    names_now = dict(zip(grown.segment_ids, grown.segment_names, strict=True))
    assert [names_now[i] for i in range(5)] == ["Alpha", "Bravo", "Charlie", "Delta", "Echo"]
    assert names_now[5].startswith("segment 5: high ")
    events = latest_events(settings, people)
    assert (segment_ids(first, events) == segment_ids(grown, events)).mean() >= 0.995
    assert (segment_ids(grown, latest_events(settings, newcomers)) == 5).mean() >= 0.99

    # A K-chosen version reproduces from its lineage, and reports from its stored K scores.
    outcome = reproduce(reproduce_config(settings), store, grown.version, 1e-6)
    assert outcome["reproduced"], outcome
    page = write_report(store, tmp_path / "report").read_text()
    assert "K=6 was chosen by the largest K with silhouette" in page
    assert (tmp_path / "report" / "k_curves.png").exists()


def test_a_vanished_cluster_is_retired_and_the_others_keep_their_ids(
    settings_factory: Callable[..., Settings], trainer_metrics: TrainerMetrics
) -> None:
    settings = settings_factory(k=None, k_max=8)  # K chosen: four clusters left should make four segments
    store = store_for(settings)
    people = population([(p, 200) for p in ONE_CHANNEL])
    produce_events(settings, people)
    first = published(settings, store, trainer_metrics)
    at_risk = segment_of_group(first, latest_events(settings, people), people, 3)

    # From now on the at-risk customers are gone from the stream; the window starts now.
    time.sleep(0.05)
    since_ms = int(time.time() * 1000)
    staying = [c for c in people if c.segment != 3]
    produce_events(settings, staying, seed=2, prefix="s")
    shrunk = published(settings, store, trainer_metrics, now_ms=since_ms + settings.window_s * 1000,
                       accept=True)

    m = shrunk.label_mapping
    assert shrunk.k == 4 and shrunk.lineage.rows_used == len(staying)
    assert [c.segment_id for c in m.retired] == [at_risk] and not m.new
    assert sorted(c.segment_id for c in m.matched) == sorted(set(first.segment_ids) - {at_risk})
    events = latest_events(settings, staying)
    assert (segment_ids(first, events) == segment_ids(shrunk, events)).mean() >= 0.995


def test_sustained_silhouette_drift_reported_by_consumers_triggers_an_early_retrain(
    settings_factory: Callable[..., Settings],
) -> None:
    settings = settings_factory(train_interval_s=600, drift_retrain_threshold=0.1,
                                drift_retrain_after_s=60)
    store = store_for(settings)
    schedule = Schedule(schedule_config(settings))
    assert schedule.due(store, now=1000.0) == "no model yet"
    store.publish(tiny_bundle(1), None)
    schedule.ran("published", now=1000.0)

    def consumers_report(drift: float, version: int = 1, replica: str = "a") -> None:
        ReplicaStates.of(store).put(replica, {"model_version": version, "silhouette_drift": drift}, 60)

    consumers_report(-0.05)  # within the threshold
    assert schedule.due(store, now=1100.0) is None
    consumers_report(-0.3, version=0, replica="b")  # a replica still on an old model: ignored
    assert schedule.due(store, now=1110.0) is None
    consumers_report(-0.2)  # beyond the threshold: the clock starts
    assert schedule.due(store, now=1120.0) is None
    assert schedule.due(store, now=1179.0) is None
    consumers_report(-0.05)  # recovered: a blip is not sustained drift
    assert schedule.due(store, now=1185.0) is None
    consumers_report(-0.2)
    assert schedule.due(store, now=1200.0) is None
    assert schedule.due(store, now=1260.0) == "sustained silhouette drift"
    schedule.ran("published", now=1260.0)
    assert schedule.due(store, now=1300.0) is None
    assert schedule.due(store, now=1860.0) == "interval"


def tiny_bundle(version: int) -> ModelBundle:
    spec = FeatureSpec(numeric=["recency_days"], center=[0.0], scale=[1.0])
    return ModelBundle(
        version=version, features=spec, centroids=[[0.0], [5.0]], segment_ids=[0, 1],
        segment_names=["a", "b"], lineage=Lineage(topic="t"),
        quality=Quality(silhouette=0.5, davies_bouldin=0.5, inertia=1.0, shares=[0.5, 0.5], sizes=[1, 1]),
    )


# --- concurrent and crashing trainers ----------------------------------------------------------
WAIT_THEN_TRAIN = """
import os, sys, time
from trainer.__main__ import main
go = sys.argv[1]
open(f"{go}.ready-{os.getpid()}", "w").close()
while not os.path.exists(go):
    time.sleep(0.001)
sys.exit(main(["once"]))
"""


def test_three_trainers_started_at_once_publish_once_per_base_version(
    settings: Settings, store: ModelStore, tmp_path: Path
) -> None:
    produce_events(settings, customers(800))
    for round_ in range(2):
        go = tmp_path / f"go-{round_}"
        trainers = [subprocess.Popen([sys.executable, "-c", WAIT_THEN_TRAIN, str(go)],
                                     env=settings_env(settings), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True) for _ in range(3)]
        # Released together once all three have imported everything.
        wait_until(lambda: len(list(tmp_path.glob(f"go-{round_}.ready-*"))) == 3, 60, "trainers ready")  # noqa: B023
        go.touch()
        outputs = [t.communicate(timeout=180) for t in trainers]
        results = sorted((t.returncode, json.loads(out)["detail"])
                         for t, (out, _) in zip(trainers, outputs, strict=True))
        assert [code for code, _ in results] == [0, 3, 3], outputs  # published, skipped, skipped
        assert all(detail.startswith("the trainer lock is held by another trainer")
                   for _, detail in results[1:])

    bundles = [store.load(v) for v in store.versions()]
    assert [b.version for b in bundles] == [1, 2]
    assert [b.previous_version for b in bundles] == [None, 1]


class ContendingStore(ModelStore):
    """A publish that waits for every other trainer to reach it: all of them fitted on the same
    base and publish at the same moment."""

    def __init__(self, settings: Settings, barrier: threading.Barrier) -> None:
        super().__init__(connect(settings), settings.redis_prefix)
        self.barrier = barrier

    def publish(self, bundle: ModelBundle, base_version: int | None) -> None:
        self.barrier.wait(120)
        super().publish(bundle, base_version)


@contextlib.contextmanager
def always_held(_state: TrainerState, _ttl_s: int) -> Iterator[bool]:
    """No lease at all (as if it had expired mid-run): every trainer believes it holds it."""
    yield True


def test_without_the_lease_the_compare_and_set_still_lets_one_trainer_publish_per_base(
    settings: Settings, store: ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(TrainerState, "lease", always_held)
    produce_events(settings, customers(800))
    config = train_config(settings)
    base: int | None = None
    for _round in range(2):
        barrier = threading.Barrier(3)
        results: list[RunResult] = []

        def trainer(barrier: threading.Barrier = barrier, results: list[RunResult] = results) -> None:
            results.append(train_once(config, ContendingStore(settings, barrier), TrainerMetrics()))

        threads = [threading.Thread(target=trainer) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert sorted(r.result for r in results) == ["published", "skipped", "skipped"]
        winner = next(r for r in results if r.result == "published")
        assert winner.bundle is not None and winner.bundle.previous_version == base
        assert all("publish lost the race" in r.detail for r in results if r is not winner)
        assert store.current_version() == winner.version
        base = winner.version

    # Versions strictly rise; the losers' versions were never written.
    assert store.versions() == bundle_keys(store) == sorted(store.versions())
    assert len(store.versions()) == 2


KILL_DURING_PUBLISH = r"""
import os, signal, sys
from redis.connection import AbstractConnection
from segmentation.metrics import TrainerMetrics
from segmentation.settings import Settings
from segmentation.model_log import ModelLog
from segmentation.store import ModelStore, connect
from trainer.__main__ import train_config
from trainer.pipeline import train_once

moment = sys.argv[1]
log_publish = ModelLog.publish
publishing = False
send = AbstractConnection.send_packed_command
publish = ModelStore.publish

def die(at):
    sys.stderr.write(f"killed at {at}\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)

def send_packed_command(self, command, check_health=True):
    data = command.encode() if isinstance(command, str) else b"".join(bytes(c) for c in command)
    if not (publishing and b"EVALSHA" in data[:32]):
        return send(self, command, check_health)
    if moment == "half-sent":  # the publish command is half on the wire
        self._sock.sendall(data[: len(data) // 2])
        die(moment)
    send(self, command, check_health)
    if moment == "sent-no-reply":  # Redis has the whole command, the trainer never sees a reply
        die(moment)

def killed_log_publish(self, bundle):
    if moment == "before-log":  # the models topic never hears of the new version
        die(moment)
    return log_publish(self, bundle)

def killed_publish(self, bundle, base_version):
    global publishing
    if moment == "before-publish":
        die(moment)
    publishing = True
    publish(self, bundle, base_version)
    die("after-publish")  # before the audit record and before the lease is released

AbstractConnection.send_packed_command = send_packed_command
ModelLog.publish = killed_log_publish
ModelStore.publish = killed_publish
settings = Settings()
train_once(train_config(settings), ModelStore(connect(settings), settings.redis_prefix), TrainerMetrics())
sys.exit("not killed")
"""


@pytest.mark.system  # kills a trainer process: the system tier (make system)
def test_a_trainer_killed_during_publish_leaves_a_valid_current_model(
    settings_factory: Callable[..., Settings],
) -> None:
    settings = settings_factory(lock_ttl_s=1)
    store = store_for(settings)
    produce_events(settings, customers(800))
    published(settings, store, TrainerMetrics())  # v1; also caches the publish script in Redis

    # A version is published once the models topic has it (the record of truth, written before
    # Redis). Redis alone is never torn: it shows the old or the new model, and the next catch-up
    # (every trainer run starts with one) brings it to the topic's version.
    for moment, lands in (("before-log", False), ("before-publish", True), ("half-sent", True),
                          ("sent-no-reply", True), ("after-publish", True)):
        sync_store(settings, store)
        before = store.current_version()
        child = subprocess.run([sys.executable, "-c", KILL_DURING_PUBLISH, moment],
                               env=settings_env(settings), capture_output=True, text=True, timeout=180)
        assert child.returncode == -signal.SIGKILL, child.stderr
        assert child.stderr.endswith(f"killed at {moment}\n"), child.stderr
        allocated = int(store.client.get(f"{settings.redis_prefix}:version_seq") or 0)
        current = store.load_current()  # parsed and validated: a torn bundle would raise here
        assert current is not None and current.version in (before, allocated), moment
        assert store.versions() == bundle_keys(store), moment
        sync_store(settings, store)
        current = store.load_current()
        assert current is not None
        if lands:
            assert current.version == allocated and current.previous_version == before, moment
        else:
            assert current.version == before, moment
            assert not store.client.exists(f"{settings.redis_prefix}:bundle:{allocated}"), moment
        assert store.versions() == bundle_keys(store), moment
        # The dead trainer never released its lease; it expires, and training goes on.
        wait_until(lambda: not store.client.exists(f"{settings.redis_prefix}:lock"), 10, "lease expiry")

    after = published(settings, store, TrainerMetrics())
    assert after.previous_version == store.versions()[-2]
    assert [store.load(v).version for v in store.versions()] == store.versions()


# --- operator commands -----------------------------------------------------------------------------
def test_rollback_republishes_an_earlier_model_as_a_new_version_that_consumers_follow(
    settings: Settings, store: ModelStore, trainer_metrics: TrainerMetrics
) -> None:
    people = customers(1000)
    produce_events(settings, people, seed=1)
    v1 = published(settings, store, trainer_metrics)
    produce_events(settings, people, seed=2, prefix="j", shift=champions_jump)
    v2 = published(settings, store, trainer_metrics, accept=True)  # a population replaced: structural
    assert v2.label_mapping.new and v2.label_mapping.retired

    with running_consumer(settings) as rc:
        def active() -> int | None:
            return None if rc.loop.watcher.active is None else rc.loop.watcher.active.version
        wait_until(lambda: active() == 2, 20, "the consumer to use v2")
        out = trainer_cli(settings, "rollback", "1")
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("v1 is current again as v3; scheduled retrains are held")
        # Consumers never go back to an older version; v3 is newer, so they follow.
        wait_until(lambda: active() == 3, 20, "the consumer to follow the rollback")

    v3 = store.load(3)
    assert (v3.centroids, v3.segment_ids, v3.segment_names, v3.features) == (
        v1.centroids, v1.segment_ids, v1.segment_names, v1.features)
    assert (v3.quality, v3.lineage) == (v1.quality, v1.lineage)
    assert v3.rolled_back_from == 1 and v3.previous_version == 2 and v3.created_at > v2.created_at
    m = v3.label_mapping
    assert [c.segment_id for c in m.restored] == [c.segment_id for c in v2.label_mapping.retired]
    assert [c.segment_id for c in m.retired] == [c.segment_id for c in v2.label_mapping.new]
    assert len(m.matched) == 4 and not m.new

    history = trainer_cli(settings, "history")
    assert history.returncode == 0, history.stderr
    lines = history.stdout.splitlines()
    assert lines[0].startswith("  v1 ") and "K=5" in lines[0] and "sil=" in lines[0]
    assert f"new={[c.segment_id for c in v2.label_mapping.new]}" in lines[1]
    assert lines[2].startswith("* v3 ") and "rollback-of-v1" in lines[2] and "restored=" in lines[2]
    assert "sizes={" in lines[2]

    again = trainer_cli(settings, "rollback", "3")
    assert again.returncode == 1 and "v3 is already current" in again.stderr
    store.client.set(f"{settings.redis_prefix}:bundle:2", b'{"version": 2}')  # damaged in storage
    damaged = trainer_cli(settings, "rollback", "2")
    assert damaged.returncode == 1 and "invalid bundle" in damaged.stderr
    assert "Traceback" not in damaged.stderr
    assert store.current_version() == 3

    # the rollback holds: the schedule does not retrain over it until an operator unpins
    schedule = Schedule(schedule_config(settings))
    assert TrainerState.of(store).pinned() == 3 and schedule.due(store) is None
    assert "pinned by a rollback" in trainer_cli(settings, "show").stdout
    unpin = trainer_cli(settings, "unpin")
    assert unpin.returncode == 0 and "resume" in unpin.stdout
    assert schedule.due(store) == "interval"


def test_reproduce_refits_a_version_from_its_recorded_offsets_and_says_when_they_are_gone(
    settings: Settings, store: ModelStore, trainer_metrics: TrainerMetrics
) -> None:
    people = customers(1000)
    produce_events(settings, people, seed=1)
    v1 = published(settings, store, trainer_metrics)
    produce_events(settings, people, seed=2, prefix="later")  # the topic moves on

    out = trainer_cli(settings, "reproduce", "1")
    assert out.returncode == 0, out.stdout + out.stderr
    outcome = json.loads(out.stdout)
    assert outcome["reproduced"] and outcome["same_data_hash"]
    assert outcome["max_centroid_difference"] <= 1e-6 and outcome["rows_used"] == 1000

    # Retention deletes the start of the topic, v1's training window with it.
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    futures = admin.delete_records([TopicPartition(settings.events_topic, r.partition, r.end)
                                    for r in v1.lineage.partitions])
    for future in futures.values():
        future.result(timeout=30)
    gone = trainer_cli(settings, "reproduce", "1")
    assert gone.returncode == 1
    outcome = json.loads(gone.stdout)
    assert not outcome["reproduced"] and "no longer" in outcome["detail"]


def test_a_sampled_window_reproduces_with_the_deployment_s_salt_and_not_with_another(
    settings_factory: Callable[..., Settings], trainer_metrics: TrainerMetrics
) -> None:
    secret = "a deployment secret for the sample"
    keyed = settings_factory(max_rows=300, sample_salt=secret)  # 600 customers: a sample of 300
    store = ModelStore(connect(keyed), keyed.redis_prefix)
    produce_events(keyed, customers(600))
    v1 = published(keyed, store, trainer_metrics)
    sample = v1.lineage.params["sample"]
    assert sample["sampled"] and sample["salt"] == "deployment" and len(sample["salt_sha256"]) == 64
    assert secret not in v1.to_json()

    assert reproduce(reproduce_config(keyed), store, v1.version, 1e-6)["reproduced"]
    other = keyed.model_copy(update={"sample_salt": None})  # a fresh key: other customers
    outcome = reproduce(reproduce_config(other), store, v1.version, 1e-6)
    assert not outcome["reproduced"] and "SEG_SAMPLE_SALT other than this one" in outcome["detail"]


def test_report_writes_a_self_contained_page_with_its_figures(
    settings: Settings, store: ModelStore, trainer_metrics: TrainerMetrics, tmp_path: Path
) -> None:
    people = customers(1000)
    produce_events(settings, people, seed=1)
    published(settings, store, trainer_metrics)
    produce_events(settings, people, seed=2, prefix="j", shift=champions_jump)
    current = published(settings, store, trainer_metrics, accept=True)  # a population replaced

    out = trainer_cli(settings, "report", "--out", str(tmp_path / "report"))
    assert out.returncode == 0, out.stderr
    index = tmp_path / "report" / "index.html"
    assert out.stdout.strip() == f"report written to {index}"
    figures = ["pca_segments.png", "silhouette_per_customer.png", "k_curves.png", "versions.png"]
    for name in figures:
        data = (tmp_path / "report" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
    page = index.read_text()
    # Self-contained: every figure is embedded, nothing is fetched.
    assert page.count('src="data:image/png;base64,') == len(figures)
    assert "http://" not in page and "https://" not in page
    for name in current.segment_names:
        assert name in page
    assert "computed for this report" in page  # fixed K: the sweep is the report's own
    assert "<b>v2</b>" in page and "<b>v1</b>" in page  # the label-change table
    assert f"{current.lineage.data_sha256}" in page


def test_a_run_that_cannot_read_its_window_is_counted_as_failed_and_the_trainer_goes_on(
    settings_factory: Callable[..., Settings],
) -> None:
    settings = settings_factory()
    broken = settings.model_copy(update={"events_topic": settings.events_topic + "-missing"})
    metrics = TrainerMetrics()
    store = ModelStore(connect(settings), settings.redis_prefix)
    result = train_once(train_config(broken), store, metrics)
    assert result.result == "failed" and "missing" in result.detail
    assert sample(metrics, "segment_trainer_runs_total", result="failed") == 1
    assert TrainerState.of(store).runs()[0]["result"] == "failed"
    assert store.current_version() is None


def test_the_trainer_lease_is_renewed_while_held_and_released_after(store: ModelStore) -> None:
    with TrainerState.of(store).lease(ttl_s=1) as held:
        assert held
        time.sleep(2.5)  # well past the TTL: only renewal keeps it
        with TrainerState.of(store).lease(ttl_s=1) as other:
            assert not other
    with TrainerState.of(store).lease(ttl_s=1) as again:
        assert again


def test_poisoned_trainer_state_in_redis_never_crashes_the_schedule_or_history(
    settings: Settings, store: ModelStore
) -> None:
    p = settings.redis_prefix
    store.publish(tiny_bundle(1), None)
    store.client.set(f"{p}:online:x", b"[1, 2]")  # a replica state that is not an object
    store.client.lpush(f"{p}:runs", b"{oops")
    store.client.zadd(f"{p}:versions", {"garbage": 2})
    assert Schedule(schedule_config(settings)).due(store) == "interval"
    assert TrainerState.of(store).runs() == [] and store.versions() == [1]
    store.client.set(f"{p}:pinned", b"not a version")
    assert TrainerState.of(store).pinned() == UNREADABLE_PIN  # held, conservatively
    assert Schedule(schedule_config(settings)).due(store) is None
    history = trainer_cli(settings, "history")
    assert history.returncode == 0, history.stderr


def errors_counted(metrics: TrainerMetrics, operation: str) -> float:
    return metrics.registry.get_sample_value("segment_redis_errors_total", {"operation": operation}) or 0.0


def test_trainer_keys_of_the_wrong_type_are_logged_counted_and_never_stop_a_run(
    settings: Settings, store: ModelStore, trainer_metrics: TrainerMetrics
) -> None:
    keys = store.keys
    store.client.rpush(keys.pinned, "x")  # a list where the pin (a string) belongs
    store.client.hset(keys.runs, "a", "b")  # a hash where the run log (a list) belongs
    store.client.hset(keys.online("x"), "a", "b")  # a hash where a replica state belongs
    schedule = Schedule(schedule_config(settings), trainer_metrics.redis_errors)
    assert schedule.due(store) is None  # an unreadable pin holds retrains, as a garbage one does
    assert errors_counted(trainer_metrics, "pinned") == 1
    state = TrainerState.of(store, trainer_metrics.redis_errors)
    assert state.runs() == []
    result = train_once(train_config(settings), store, trainer_metrics)  # no window yet: skipped, recorded
    assert result.result == "skipped"
    assert errors_counted(trainer_metrics, "run_log") == 2  # the read above and the run's record
    history = trainer_cli(settings, "history")
    assert history.returncode == 0, history.stderr


def test_a_full_redis_refusing_the_lease_skips_the_run_instead_of_killing_the_trainer(
    settings_factory: Callable[..., Settings], tmp_path: Path
) -> None:
    """``maxmemory`` far below what Redis holds, nothing evictable: every write answers OOM, the
    lease's ``SET NX`` included. The run is skipped, the errors logged and counted."""
    port = free_port()
    server = start_redis(tmp_path, port, "--maxmemory-policy", "noeviction")
    try:
        settings = settings_factory(redis_url=f"redis://127.0.0.1:{port}/0")
        store = store_for(settings)
        for i in range(5):  # 5 MB held, then a limit of 1 MB: full however memory moves
            store.client.set(f"ballast-{i}", b"x" * 1_000_000)
        store.client.config_set("maxmemory", "1mb")
        with pytest.raises(redis.ResponseError, match="maxmemory"):
            store.client.set(store.keys.lock, "even a small write")
        metrics = TrainerMetrics()
        result = train_once(train_config(settings), store, metrics)
        assert result.result == "skipped" and "lock" in result.detail
        assert errors_counted(metrics, "lease") == 1 and errors_counted(metrics, "run_log") == 1
    finally:
        server.terminate()
        server.wait(10)
