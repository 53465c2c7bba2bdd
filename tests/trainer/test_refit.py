"""A refit judged without I/O (``trainer.refit``): the first model's fallback to another K, the
structure check, a structural change held at the current K, and "no segment structure" as an
outcome. Ids across an ageing customer base: ``tests/trainer/test_drift_scenarios.py``."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from quality.offline import IdSequences, fit_features, retrain
from segmentation.baseline import recorded_baseline
from segmentation.features import FeatureSpec
from segmentation.settings import Settings
from trainer.__main__ import gate_limits
from trainer.fit import fit_kmeans
from trainer.refit import Matching, Refit, assess

pytestmark = pytest.mark.quality  # model quality over many fits: make system, not make test

SETTINGS = Settings()


def settings_for(columns: int) -> Settings:
    """The defaults on ``columns`` plain numeric features (kind ``other``)."""
    return SETTINGS.model_copy(update={"features": tuple(f"x{i}" for i in range(columns)),
                                       "categorical": (), "feature_kinds": {}})


def blobs(rng: np.random.Generator, centres: list[list[float]], sizes: list[int]) -> np.ndarray:
    return np.vstack([rng.normal(c, 1.0, (n, len(c))) for c, n in zip(centres, sizes, strict=True)])


def four_spec() -> FeatureSpec:
    return FeatureSpec(numeric=["a", "b"], center=[0.0, 0.0], scale=[1.0, 1.0])


def test_a_first_model_that_fails_the_gate_falls_back_to_the_nearest_k_that_passes() -> None:
    rng = np.random.default_rng(0)
    # three populations and a handful of stray rows far away: K=4 gives the strays a segment
    x = blobs(rng, [[0, 0], [12, 0], [0, 12], [40, 40]], [600, 600, 600, 6])
    four, three = (fit_kmeans(x, k, 3, 0, 1000) for k in (4, 3))
    refit = assess(four_spec(), x, four, [three, four], None, None, None, gate_limits(SETTINGS),
                   Matching(0.5, 3.0, {}), silhouette_sample=1000, random_state=0)
    assert refit.fallback_from == 4 and refit.fit.k == 3 and not refit.failures


def test_a_refit_that_moves_many_customers_to_new_segments_needs_an_accept() -> None:
    rng = np.random.default_rng(1)
    layout: list[list[float]] = [[0, 0], [10, 0], [0, 10]]
    settings = settings_for(2)
    first = retrain(blobs(rng, layout, [500, 500, 500]), None, IdSequences(), settings)
    assert first.bundle is not None
    # a fourth population of 25% of the customers, far from the others: a birth
    grown = blobs(rng, [*layout, [14, 14]], [500, 500, 500, 500])
    run = retrain(grown, first.bundle, IdSequences(), settings)
    assert run.bundle is None and {f.check for f in run.failures} == {"structure"}
    accepted = retrain(grown, first.bundle, IdSequences(ids=itertools.count(100)), settings, accept=True)
    assert accepted.bundle is not None
    born = [d for d in accepted.bundle.label_mapping.diff if d.status == "born"]
    assert len(born) == 1 and born[0].segment_id >= 100
    kept = {d.segment_id for d in accepted.bundle.label_mapping.diff if d.status == "kept"}
    assert kept == set(first.bundle.segment_ids)


def test_a_window_without_segments_is_reported_as_such_and_publishes_nothing() -> None:
    rng = np.random.default_rng(3)
    one_population = rng.lognormal(3.0, 0.5, size=(3000, 6))
    run = retrain(one_population, None, IdSequences(), settings_for(6))
    assert run.refit is not None and run.refit.no_structure
    assert run.bundle is None and run.fit.k == 1


def test_a_structural_change_at_another_k_is_held_and_the_current_k_is_published() -> None:
    rng = np.random.default_rng(4)
    layout: list[list[float]] = [[0, 0], [10, 0], [0, 10]]
    settings = settings_for(2).model_copy(update={"k": 3})
    first = retrain(blobs(rng, layout, [500, 500, 500]), None, IdSequences(), settings)
    assert first.bundle is not None and first.bundle.k == 3
    raw = blobs(rng, layout, [500, 500, 500])  # the same customers' segments, another window
    spec = fit_features(raw, settings, first.bundle)
    x, x_previous = spec.encode_numeric(raw), first.bundle.features.encode_numeric(raw)
    two, three = (fit_kmeans(x, k, 3, 0, 1000) for k in (2, 3))  # K=2 merges two segments

    baseline = recorded_baseline(first.bundle)

    def judged(force: bool) -> Refit:
        return assess(spec, x, two, [two, three], first.bundle, x_previous, baseline,
                      gate_limits(settings), Matching(0.5, 3.0, {}), silhouette_sample=1000,
                      random_state=0, force=force)

    held = judged(force=False)
    assert held.fit.k == 3 and held.fallback_from == 2 and not held.failures
    forced = judged(force=True)  # --force / --accept: the change the operator asked for
    assert forced.fit.k == 2 and {"structure", "silhouette_drop"} <= {f.check for f in forced.failures}


def test_a_segment_whose_customers_all_moved_on_retires_and_the_others_keep_their_ids() -> None:
    """At-risk customers who all lapsed: the segment holds 3 of 2,003 customers. The refit K
    chooses is refused (a structural change without an accept), the current segments refitted
    keep an empty one (refused: min share); without it they publish, and only those 3 change
    id. A K pinned by the operator (SEG_K) is never changed this way: there the refit is refused."""
    rng = np.random.default_rng(5)
    settings = settings_for(2)
    registry = IdSequences()
    first = retrain(blobs(rng, [[0, 0], [10, 0], [0, 10], [10, 10]], [500] * 4), None, registry, settings)
    assert first.bundle is not None and first.bundle.k == 4
    window = blobs(rng, [[0, 0], [10, 0], [0, 10], [10, 10]], [500, 500, 1000, 3])
    run = retrain(window, first.bundle, registry, settings)
    assert run.bundle is not None and run.refit is not None and not run.failures
    assert run.refit.continued and run.refit.fallback_from is not None and len(run.refit.retiring) == 1
    diff = {d.segment_id: d for d in run.bundle.label_mapping.diff}
    retired = [d for d in diff.values() if d.status == "retired"]
    assert len(retired) == 1 and retired[0].customers == 3
    assert sorted(run.bundle.segment_ids) == sorted(set(first.bundle.segment_ids) - {retired[0].segment_id})
    gate = run.bundle.quality.gate
    assert gate is not None and gate["retired_emptied"] == str(retired[0].segment_id)
    assert "structure" in str(gate["refused_checks"]).split(",")
    forced = retrain(window, first.bundle, registry, settings, force=True)  # what was refused
    assert forced.bundle is not None and forced.bundle.k == run.refit.fallback_from
    assert "structure" in {f.check for f in forced.failures}
    pinned = retrain(window, first.bundle, registry, settings.model_copy(update={"k": 4}))
    assert pinned.bundle is None and "structure" in {f.check for f in pinned.failures}
