"""What the quality gate and the consumer's drift signal do when segments go: over random
layouts, a first accepted model, then a retrain on each scenario's window (forced, so that both
what the gate said and what a forced publish would show are seen).

* stationary: the same populations (must publish; events keep their ids);
* collapse: centres pulled to 30% of their distance from the mean, spreads unchanged;
* merge: the two closest populations meeting at their midpoint;
* tiny segment: one population down to 0.5% of the window (under the 1% min_share floor);
* outliers: the same populations, 0.3% of the customers with one value 10^3 to 10^6 times its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from quality.layouts import Layout, random_layout
from quality.offline import IdSequences, Published, failed_checks, retrain, segment_ids, tracked_drift
from segmentation.bundle import ModelBundle
from segmentation.settings import Settings

LAYOUTS = 20
# Like the demo's (silhouette ~0.7): a first model this good is what a deployment starts from.
FIRST_SILHOUETTE = 0.6

WINDOWS: dict[str, Callable[[Layout, np.random.Generator], np.ndarray]] = {
    "stationary": lambda layout, rng: layout.window(rng),
    "collapse": lambda layout, rng: layout.window(rng, layout.collapsed()),
    "merge": lambda layout, rng: layout.window(rng, layout.merged()),
    "tiny segment": lambda layout, rng: layout.window(rng, sizes=layout.tiny_sizes()),
    "outliers": lambda layout, rng: layout.with_outliers(rng),
}


def first_model(rng: np.random.Generator, settings: Settings) -> tuple[Layout, IdSequences, ModelBundle]:
    """A random layout of five well separated populations and its first, accepted, model."""
    while True:
        layout = random_layout(rng)
        registry = IdSequences()
        first = retrain(layout.window(rng), None, registry, settings)
        if first.bundle is not None and first.fit.silhouette >= FIRST_SILHOUETTE:
            return layout, registry, first.bundle


@dataclass(frozen=True)
class Outcome:
    """One scenario on one layout."""

    run: Published  # forced: the gate's failures are recorded, the bundle exists
    drift_kept: float  # the consumer's drift on the scenario's events with the first model kept
    drift_forced: float  # ... after a forced publish of the refit
    ids_kept: float  # share of events keeping their segment id across the forced publish


def outcome(layout: Layout, v1: ModelBundle, registry: IdSequences, window: np.ndarray,
            events: np.ndarray, settings: Settings) -> Outcome:
    run = retrain(window, v1, registry, settings, force=True)
    if run.bundle is None:
        raise RuntimeError("a forced retrain published nothing")
    return Outcome(run, tracked_drift(v1, events), tracked_drift(run.bundle, events),
                   float((segment_ids(v1, events) == segment_ids(run.bundle, events)).mean()))


@dataclass(frozen=True)
class ScenarioRow:
    name: str
    outcomes: list[Outcome]

    @property
    def refused(self) -> int:
        return sum(o.run.refused for o in self.outcomes)

    @property
    def checks(self) -> dict[str, int]:
        return failed_checks([o.run for o in self.outcomes])

    def mean(self, value: Callable[[Outcome], float]) -> float:
        return float(np.mean([value(o) for o in self.outcomes]))


def scenario_table(settings: Settings, layouts: int = LAYOUTS) -> tuple[list[ScenarioRow], float]:
    """Every scenario over ``layouts`` random layouts; also the first models' mean silhouette."""
    found: dict[str, list[Outcome]] = {name: [] for name in WINDOWS}
    first_silhouettes = []
    for seed in range(layouts):
        rng = np.random.default_rng(seed)
        layout, registry, v1 = first_model(rng, settings)
        first_silhouettes.append(v1.quality.silhouette)
        for name, window in WINDOWS.items():
            found[name].append(outcome(layout, v1, registry, window(layout, rng), window(layout, rng),
                                       settings))
    rows = [ScenarioRow(name, outcomes) for name, outcomes in found.items()]
    return rows, float(np.mean(first_silhouettes))
