"""A collapsed or merged model never goes live silently.

Offline and fast: random layouts of five well separated populations in the demo's six features
(``quality.layouts``: each population spread 13% around its mean, as the demo producer's
customers are), fitted, gated and matched by ``quality.offline.retrain``, the trainer's own
functions in the order ``trainer.pipeline`` calls them, only without Kafka and Redis (``make
quality`` runs the same layouts for docs/model-quality.md). Each layout is retrained on a fresh
window of:

* the same populations (stationary): must publish, and events keep their ids;
* the populations with their centres pulled towards each other, spreads unchanged (collapse);
* the two closest populations meeting at their midpoint (merge);
* one population moved by two of its standard deviations (drift): keeps its id;
* one population gone and a different one 6 of its standard deviations from it (new
  population): a fresh id, not the vanished segment's.

The consumer's drift signal after a forced publish of a collapse is checked with its own
``DriftTracker``; the alert expression against a real Prometheus is in
``test_a_forced_collapse_keeps_the_drift_and_quality_alerts_true_in_a_real_prometheus``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from demo.generator import PROFILES, Customer, Profile, make_customers
from demo.producer import DemoProducer
from quality.datasets import TYPICAL
from quality.layouts import RELATIVE_SPREAD, Layout, rows_of
from quality.offline import IdSequences, Published, failed_checks, retrain, segment_ids, tracked_drift
from quality.scenarios import first_model
from segmentation.baseline import QualityBaseline, baseline_of
from segmentation.bundle import Lineage, ModelBundle, Quality
from segmentation.features import FeatureSpec
from segmentation.metrics import TrainerMetrics
from segmentation.settings import Settings
from segmentation.store import ModelStore, connect
from tests.support.prometheus import (
    Process,
    local_prometheus,
    need,
    start_trainer_and_consumer,
    tails,
)
from tests.support.stack import free_port, produce_events, wait_until
from trainer.__main__ import train_config
from trainer.gate import silhouette_allowance
from trainer.pipeline import train_once

pytestmark = pytest.mark.quality  # model quality over many fits: make system, not make test

# The defaults a deployment gets, with K fixed at the five populations of these layouts: the
# gate and the matching are what is tested here (choosing K: tests/trainer/test_drift_scenarios.py).
SETTINGS = Settings(k=5)
LAYOUTS = 20


@dataclass
class Scenario:
    """One layout: its first accepted model, and each retrain."""

    layout: Layout
    v1: ModelBundle
    runs: dict[str, Published]
    test_rows: dict[str, np.ndarray]
    registry: IdSequences


def scenario(seed: int) -> Scenario:
    rng = np.random.default_rng(seed)
    layout, registry, v1 = first_model(rng, SETTINGS)
    windows = {"stationary": layout.means, "collapse": layout.collapsed(), "merge": layout.merged(),
               "drift": layout.drifted(rng), "new population": layout.replaced(rng)}
    runs, test_rows = {}, {}
    for name, means in windows.items():
        runs[name] = retrain(layout.window(rng, means), v1, registry, SETTINGS, force=True)
        test_rows[name] = layout.window(rng, means)
    return Scenario(layout, v1, runs, test_rows, registry)


@pytest.fixture(scope="module")
def scenarios() -> list[Scenario]:
    return [scenario(seed) for seed in range(LAYOUTS)]


# --- point 1: the gate remembers ---------------------------------------------------------------------
def test_a_collapse_is_refused_in_at_least_19_of_20_random_layouts(scenarios: list[Scenario]) -> None:
    runs = [s.runs["collapse"] for s in scenarios]
    print(f"\ncollapse refused {sum(r.refused for r in runs)}/{len(runs)}, by check {failed_checks(runs)}; "
          f"silhouette {np.mean([s.v1.quality.silhouette for s in scenarios]):.2f} -> "
          f"{np.mean([r.fit.silhouette for r in runs]):.2f}, Davies-Bouldin "
          f"{np.mean([s.v1.quality.davies_bouldin for s in scenarios]):.2f} -> "
          f"{np.mean([r.fit.davies_bouldin for r in runs]):.2f}")
    assert sum(r.refused for r in runs) >= 19


def test_a_merge_is_refused_in_at_least_19_of_20_random_layouts(scenarios: list[Scenario]) -> None:
    runs = [s.runs["merge"] for s in scenarios]
    print(f"\nmerge refused {sum(r.refused for r in runs)}/{len(runs)}, by check {failed_checks(runs)}")
    assert sum(r.refused for r in runs) >= 19


def test_stationary_retrains_publish_and_keep_at_least_99_5_percent_of_events_on_their_id(
    scenarios: list[Scenario]
) -> None:
    kept = []
    for s in scenarios:
        run = s.runs["stationary"]
        assert not run.failures, [f.detail for f in run.failures]
        assert run.bundle is not None and not run.bundle.label_mapping.new
        rows = s.test_rows["stationary"]
        kept.append(float((segment_ids(s.v1, rows) == segment_ids(run.bundle, rows)).mean()))
    print(f"\nstationary: {len(kept)}/{len(scenarios)} published; events keeping their id: "
          f"min {min(kept):.4%}, mean {np.mean(kept):.4%}")
    assert min(kept) >= 0.995


def test_a_drifted_population_passes_the_gate_and_a_replaced_one_needs_an_accept(
    scenarios: list[Scenario]
) -> None:
    drift = [s.runs["drift"] for s in scenarios]
    print(f"\ndrift: refused {sum(r.refused for r in drift)}/{len(drift)} {failed_checks(drift)}")
    assert sum(r.refused for r in drift) <= 1
    # A population gone and another in its place moves a fifth of the customers to a new id: a
    # structural change, which only the structure check stops.
    replaced = [s.runs["new population"] for s in scenarios]
    print(f"new population: refused {sum(r.refused for r in replaced)}/{len(replaced)} "
          f"{failed_checks(replaced)}")
    assert sum(r.refused for r in replaced) >= 19
    assert set(failed_checks(replaced)) == {"structure"}


def test_a_forced_publish_records_the_overridden_checks_and_keeps_the_accepted_baseline(
    scenarios: list[Scenario]
) -> None:
    s = next(s for s in scenarios if s.runs["collapse"].refused)
    forced = s.runs["collapse"].bundle
    assert forced is not None and forced.forced
    gate = forced.quality.gate
    assert gate["passed"] is False
    assert set(str(gate["overridden"]).split(",")) == {f.check for f in s.runs["collapse"].failures}
    assert baseline_of(forced) == QualityBaseline(s.v1.quality.silhouette, s.v1.quality.davies_bouldin, 1)
    # JSON round trip (what Redis and the models topic hold)
    assert baseline_of(ModelBundle.from_json(forced.to_json())) == baseline_of(forced)

    # The next collapsed window is refused again, against the accepted model's figures, not the
    # forced model's: a forced publish does not lower the bar.
    again = retrain(s.layout.window(np.random.default_rng(99), s.layout.collapsed()), forced, s.registry,
                    SETTINGS)
    assert again.bundle is None
    drop = next(f for f in again.failures if f.check == "silhouette_drop")
    allowed = silhouette_allowance(s.v1.quality.silhouette, SETTINGS.gate_max_silhouette_drop,
                                   SETTINGS.gate_silhouette_budget, again.refit.noise if again.refit else 0.0)
    assert allowed is not None
    assert drop.limit == pytest.approx(s.v1.quality.silhouette - allowed)
    # The same window passes the same-window comparison with the forced model (the old gate's
    # blind spot): only the remembered baseline refuses it.
    assert "silhouette" not in {f.check for f in again.failures}

    # Back to the healthy populations: every customer is novel to the collapsed model, so the
    # retrain is a structural change; the operator's accept publishes it as the new anchor.
    healthy = retrain(s.layout.window(np.random.default_rng(98)), forced, s.registry, SETTINGS, accept=True)
    assert healthy.bundle is not None and {f.check for f in healthy.failures} <= {"structure"}
    assert baseline_of(healthy.bundle).version == healthy.bundle.version


def test_a_bundle_from_before_baselines_is_its_own_baseline() -> None:
    spec = FeatureSpec(numeric=["x"], center=[0.0], scale=[1.0])
    legacy = ModelBundle.model_validate_json(ModelBundle(
        version=4, features=spec, centroids=[[0.0], [5.0]], segment_ids=[0, 1], segment_names=["a", "b"],
        quality=Quality(silhouette=0.6, davies_bouldin=0.5, inertia=1.0, shares=[0.5, 0.5], sizes=[5, 5],
                        gate={"passed": True, "current_silhouette": "none"}),
        lineage=Lineage(topic="t"),
    ).to_json())
    assert baseline_of(legacy) == QualityBaseline(0.6, 0.5, 4)


def test_the_floors_refuse_a_first_model_on_data_without_segments() -> None:
    # No previous model, so nothing to remember: the absolute floors alone refuse five segments
    # cut out of one population. (Its pieces are about 3.0 standard deviations apart, at the
    # spread-separation floor: that check is for two segments merged into one, ~2.65.)
    rng = np.random.default_rng(5)
    one_population = rng.normal(TYPICAL, RELATIVE_SPREAD * TYPICAL, size=(3000, 6))
    run = retrain(one_population, None, IdSequences(), SETTINGS)
    assert {"min_silhouette", "max_davies_bouldin"} <= {f.check for f in run.failures}
    assert run.fit.silhouette < 0.15
    # Choosing K (the default), the same window is reported as having no segment structure.
    chosen = retrain(one_population, None, IdSequences(), Settings())
    assert chosen.refit is not None and chosen.refit.no_structure and chosen.bundle is None


# --- point 5: matching in spread units ---------------------------------------------------------------
def ids_of(bundle: ModelBundle, rows: np.ndarray) -> set[int]:
    values, counts = np.unique(segment_ids(bundle, rows), return_counts=True)
    return {int(v) for v, n in zip(values, counts, strict=True) if n >= 0.2 * rows.shape[0]}


def test_a_drifted_population_keeps_its_id(scenarios: list[Scenario]) -> None:
    kept = 0
    for s in scenarios:
        run = s.runs["drift"].bundle
        assert run is not None
        before = s.test_rows["stationary"]
        after = s.test_rows["drift"]
        same = [ids_of(s.v1, before[rows_of(p)]) == ids_of(run, after[rows_of(p)]) for p in range(5)]
        assert all(same[:2] + same[3:])  # the populations that did not move
        kept += same[2]
    print(f"\ndrift of 2 standard deviations: id kept in {kept}/{len(scenarios)}")
    assert kept >= 19


def test_a_merged_segment_gets_new_ids(scenarios: list[Scenario]) -> None:
    fresh = 0
    for s in scenarios:
        run = s.runs["merge"].bundle
        assert run is not None
        a, b = s.layout.closest_pair()
        old = ids_of(s.v1, s.test_rows["stationary"][rows_of(a)]) | ids_of(
            s.v1, s.test_rows["stationary"][rows_of(b)])
        merged = ids_of(run, s.test_rows["merge"][rows_of(a)])
        fresh += not (merged & old)
    print(f"\nmerge: the merged population got only new ids in {fresh}/{len(scenarios)}")
    assert fresh >= 19


def test_a_new_population_does_not_inherit_a_vanished_segment_s_id(scenarios: list[Scenario]) -> None:
    fresh = 0
    for s in scenarios:
        run = s.runs["new population"].bundle
        assert run is not None
        vanished = ids_of(s.v1, s.test_rows["stationary"][rows_of(3)])
        newcomer = ids_of(run, s.test_rows["new population"][rows_of(3)])
        assert vanished <= {c.segment_id for c in run.label_mapping.retired} or newcomer & vanished
        fresh += not (newcomer & vanished)
        for p in (0, 1, 2, 4):  # the others keep theirs
            assert ids_of(s.v1, s.test_rows["stationary"][rows_of(p)]) == ids_of(
                run, s.test_rows["new population"][rows_of(p)])
    print(f"\nnew population: a fresh id in {fresh}/{len(scenarios)}")
    assert fresh >= 19


# --- point 2: drift that does not reset ----------------------------------------------------------
def test_after_a_forced_collapse_the_consumer_drift_stays_negative(scenarios: list[Scenario]) -> None:
    drifts, unanchored = [], []
    for s in scenarios:
        forced = s.runs["collapse"].bundle
        assert forced is not None
        rows = s.test_rows["collapse"]
        drifts.append(tracked_drift(forced, rows))
        # what the consumer read before: the forced model measured against itself
        own = forced.model_copy(update={"quality": forced.quality.model_copy(update={"gate": {}})})
        unanchored.append(tracked_drift(own, rows))
    print(f"\ndrift after a forced collapse: anchored max {max(drifts):+.3f} (mean {np.mean(drifts):+.3f}); "
          f"against the forced model's own silhouette mean {np.mean(unanchored):+.3f}")
    assert max(drifts) < -SETTINGS.drift_retrain_threshold
    assert max(abs(d) for d in unanchored) < 0.05  # the blind spot this closes


# --- the same on the real stack, with a real Prometheus ----------------------------------------
def collapsed_profiles(pull: float = 0.3) -> tuple[Profile, ...]:
    """The demo's five profiles with their centres pulled towards their mean (the demo's noise
    is multiplicative, so the spreads shrink a little with the smaller centres)."""
    means = np.array([p.means for p in PROFILES], dtype=np.float64)
    centre = means.mean(axis=0)
    pulled = centre + pull * (means - centre)
    return tuple(Profile(p.name, tuple(m.tolist()), p.channels)
                 for p, m in zip(PROFILES, pulled, strict=True))


class CollapsedProducer(DemoProducer):
    """The demo producer, sending events of ``people`` (no malformed ones)."""

    def __init__(self, settings: Settings, people: list[Customer]) -> None:
        super().__init__(settings, run_id="collapse", rate=300.0, malformed_every=0)
        self.customers = people


@pytest.mark.integration
def test_a_forced_collapse_keeps_the_drift_and_quality_alerts_true_in_a_real_prometheus(
    settings_factory: Callable[..., Settings], tmp_path: Path
) -> None:
    need("prometheus")
    need("promtool")
    # No scheduled retrain and no early retrain on drift during the test: the trainer process
    # runs once at start, on the collapsed window, and the gate refuses that run.
    settings = settings_factory(train_interval_s=3600, drift_retrain_after_s=3600)
    store = ModelStore(connect(settings), settings.redis_prefix)
    rng = np.random.default_rng(1)
    produce_events(settings, make_customers(1500, rng))
    first = train_once(train_config(settings), store, TrainerMetrics())
    assert first.result == "published" and first.bundle is not None, first.detail

    # The same customers later, their five profiles pulled towards each other.
    collapsed = make_customers(1500, rng, profiles=collapsed_profiles())
    produce_events(settings, collapsed, seed=2, prefix="k")
    refusal = train_once(train_config(settings), store, TrainerMetrics())
    assert refusal.result == "rejected", refusal.detail
    assert "silhouette_drop" in {f.check for f in refusal.failures}, refusal.detail
    forced = train_once(train_config(settings), store, TrainerMetrics(), force=True)
    assert forced.result == "published" and forced.bundle is not None and forced.bundle.forced
    assert baseline_of(forced.bundle).version == first.bundle.version
    print(f"\nreal stack: v1 silhouette {first.bundle.quality.silhouette:.3f} / DB "
          f"{first.bundle.quality.davies_bouldin:.3f}; collapse {forced.bundle.quality.silhouette:.3f} / "
          f"{forced.bundle.quality.davies_bouldin:.3f}, refused by {[f.check for f in refusal.failures]}")

    ports = {"consumer": free_port(), "trainer": free_port()}
    prometheus = local_prometheus(tmp_path, ports)
    producer = CollapsedProducer(settings, collapsed)
    producing = threading.Thread(target=producer.run, name="collapse-producer", daemon=True)
    processes: list[Process] = []
    try:
        start_trainer_and_consumer(processes, settings, ports, tmp_path)
        prometheus.start()
        producing.start()

        def logs() -> str:
            return tails(processes)

        rules = {r["name"]: r for g in prometheus.api("rules")["groups"] for r in g["rules"]}
        wanted = ("SegmentSilhouetteDrift", "PublishedModelBelowBaseline", "QualityGateFailing")
        started = time.monotonic()
        deadline = started + 120
        pending = set(wanted)
        while pending:
            drift_now = prometheus.query("segment_silhouette_drift")
            assert time.monotonic() < deadline, f"never true: {sorted(pending)}; drift {drift_now}\n{logs()}"
            assert all(p.proc.poll() is None for p in processes), logs()
            pending = {name for name in pending if not prometheus.query(rules[name]["query"])}
            time.sleep(1)
        all_true = time.monotonic() - started
        assert prometheus.scalar('segment_model_version{job="consumer"}') == forced.version
        # ... and the drift stays there: every scrape over the next two recomputations of the
        # sampled silhouette (every 15 s in the consumer), whatever its model says of itself.
        # Waited for as two new values scraped (at most 32 s, the two recomputations' bound).
        seen = [prometheus.scalar("segment_silhouette_drift")]
        held_from = time.monotonic()

        def recomputed_twice() -> bool:
            now = prometheus.query("segment_silhouette_drift")
            if len(now) == 1 and float(now[0]["value"][1]) != seen[-1]:
                seen.append(float(now[0]["value"][1]))
            return len(seen) >= 3 or time.monotonic() - held_from >= 32

        wait_until(recomputed_twice, 60, "two recomputations of the sampled silhouette")
        held = max(2, round(time.monotonic() - held_from))
        drift = prometheus.scalar(f"max_over_time(segment_silhouette_drift[{held}s])")
        assert drift < -0.1, drift
        assert prometheus.query(rules["SegmentSilhouetteDrift"]["query"]), "drift expression no longer true"
        print(f"real Prometheus: {', '.join(wanted)} true {all_true:.0f}s after start; "
              f"drift over the next 30 s at most {drift:+.3f}")
    finally:
        producer.stop.set()
        if producing.is_alive():
            producing.join(40)
        for p in processes:
            p.stop()
        prometheus.stop()
