"""Retrains over time keep ids on the customers and name what changed (``quality.drift``).

Offline, through the trainer's own functions (``quality.offline.retrain``), with the default
settings choosing K. A few seeds each, drawn apart from the ones ``make quality`` reports and
the ones the thresholds were tuned on: ``make quality`` measures ten of each
(docs/model-quality.md).
"""

from __future__ import annotations

import numpy as np
import pytest

from quality import drift
from segmentation.settings import Settings

pytestmark = pytest.mark.quality  # model quality over many fits: make system, not make test

REALISTIC = drift.realistic_settings(Settings())
LAYOUTS = drift.layout_settings(Settings())
SEEDS = range(200, 203)


def test_an_ageing_cohort_publishes_every_quarter_and_keeps_its_ids() -> None:
    run = drift.ageing_cohort(2005, REALISTIC)
    print(f"\nageing cohort: {run.published}/{run.quarters} quarters published, ids kept {run.kept:.2%}")
    assert run.published == run.quarters
    assert run.kept >= 0.95


def test_a_stationary_retrain_publishes_and_keeps_ids() -> None:
    runs = [drift.stationary(seed, REALISTIC) for seed in (2001, 2002)]
    print(f"\nstationary: {runs}")
    assert all(r.published for r in runs)
    assert min(r.kept for r in runs) >= 0.98


def test_a_new_population_is_born_with_a_new_id() -> None:
    runs = [drift.birth(seed, LAYOUTS) for seed in SEEDS]
    print(f"\nbirth: {runs}")
    assert all(r.named for r in runs)
    assert all(r.needed_accept for r in runs)  # 10% of the customers: over the structure limit


def test_a_merge_is_named_with_both_parents() -> None:
    runs = [drift.merge(seed, LAYOUTS) for seed in SEEDS]
    print(f"\nmerge: {runs}")
    assert sum(r.named for r in runs) >= 2


def test_a_split_is_named_with_its_parent() -> None:
    runs = [drift.split(seed, LAYOUTS) for seed in SEEDS]
    print(f"\nsplit: {runs}")
    assert sum(r.named for r in runs) >= 2


def test_a_collapse_in_small_steps_is_refused_against_the_anchor() -> None:
    runs = [drift.ratchet(seed, LAYOUTS) for seed in SEEDS[:2]]
    print(f"\nratchet: {runs}")
    assert all(r.refused_at is not None for r in runs)
    # never a published model further below the anchor than the allowance (plus noise)
    assert all(r.published_drop <= r.allowed + 0.02 for r in runs)


def test_ageing_moves_tenure_for_everyone_and_recency_for_the_quiet() -> None:
    rows = np.array([[10.0, 2, 5, 80.0, 40.0, 6, 300, 2.0]] * 2)
    aged = drift.aged(rows, np.array([0, 1]), 91.0)
    assert aged[:, 6].tolist() == [391.0, 391.0]
    assert aged[:, 0].tolist() == [10.0, 101.0]
    assert aged[1, 1] == 0.0 and aged[1, 3] == 0.0  # the quiet customer's 90-day window emptied
