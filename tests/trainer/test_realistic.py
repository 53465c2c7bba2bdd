"""Realistic customer data (quality/realistic.py, tuning seeds only): preprocessing by feature
kind, the training envelope, and K selection that can say "one segment". The held-out figures are
``make quality``'s (docs/model-quality.md)."""

from __future__ import annotations

import numpy as np
import pytest

from quality.k_table import choosing_settings, run_pipeline
from quality.realistic import BLOB_SHAPES, FEATURES, KINDS, blob, realistic
from segmentation.bundle import BundleError, Lineage, ModelBundle, Quality
from segmentation.features import FeatureConfig, fit_numeric
from segmentation.settings import Settings
from trainer.__main__ import k_config
from trainer.fit import fit_model

pytestmark = pytest.mark.quality  # model quality over many fits: make system, not make test

SETTINGS = Settings()


def realistic_spec(seed: int):  # type: ignore[no-untyped-def]
    dataset = realistic(seed)
    config = FeatureConfig.of(SETTINGS.model_copy(update={"features": FEATURES}))
    return dataset, fit_numeric(dataset.rows, config)


def test_the_default_settings_know_the_kinds_of_the_usual_customer_features() -> None:
    config = FeatureConfig.of(SETTINGS.model_copy(update={"features": FEATURES}))
    assert dict(config.kinds) == KINDS


def test_absurd_rows_fall_outside_the_envelope_and_the_two_percent_segment_stays_inside() -> None:
    dataset, spec = realistic_spec(1)
    outside = spec.outside_envelope(dataset.rows)
    small = dataset.truth == 2  # the 2% wholesale segment
    assert 0.003 <= outside.mean() <= 0.007  # about the 0.5% absurd rows
    assert outside[small].mean() <= 0.02


def test_mostly_zero_counts_and_money_weigh_less_and_the_consumer_applies_it() -> None:
    dataset, spec = realistic_spec(0)
    x = spec.encode_numeric(dataset.rows[~spec.outside_envelope(dataset.rows)])
    spread = dict(zip(FEATURES, x.std(axis=0), strict=True))
    assert spread["frequency_90d"] < 0.7 and spread["monetary_90d"] < 0.7  # zero for over 30%
    assert spread["avg_basket_value"] == pytest.approx(1.0)
    assert spec.clock_features == ["recency_days", "tenure_days"]
    row = dataset.rows[:50][~spec.outside_envelope(dataset.rows[:50])]
    back = spec.to_raw_numeric(spec.encode_numeric(row))
    assert np.allclose(back, row, rtol=1e-9, atol=1e-6)


@pytest.mark.parametrize("shape", BLOB_SHAPES)
def test_one_population_is_reported_as_no_segment_structure(shape: str) -> None:
    dataset = blob(shape, 0)
    run = run_pipeline(dataset, choosing_settings(dataset, SETTINGS))
    assert run.fit.k == 1 and run.fit.no_structure
    assert "one segment" in run.fit.reason


def test_automatic_k_finds_segments_on_realistic_data_within_one_of_the_truth() -> None:
    dataset = realistic(5)  # true K = 8
    run = run_pipeline(dataset, choosing_settings(dataset, SETTINGS))
    assert abs(run.fit.k - dataset.true_k) <= 1
    assert [f.stability for f in run.fits if f.k == run.fit.k][0] >= 0.85


def test_the_current_k_is_kept_while_it_still_qualifies() -> None:
    dataset, spec = realistic_spec(4)
    x = spec.encode_numeric(dataset.rows[~spec.outside_envelope(dataset.rows)])
    config = k_config(SETTINGS.model_copy(update={"k": None}))
    fit, fits = fit_model(x, config)
    others = [f.k for f in fits if f.k != fit.k and f.reason == ""]
    kept, _ = fit_model(x, config, current_k=fit.k)
    assert kept.k == fit.k
    unqualified = next(k for k in others if k > fit.k)  # a larger K never qualifies here
    assert fit_model(x, config, current_k=unqualified)[0].k == fit.k


def test_a_bundle_without_kinds_validates_and_unknown_kinds_are_refused() -> None:
    _, spec = realistic_spec(0)
    bundle = ModelBundle(version=1, features=spec.model_copy(update={"kinds": {}}), centroids=[[0.0] * 8],
                         segment_ids=[0], segment_names=["all"],
                         quality=Quality(silhouette=0.0, davies_bouldin=0.0, inertia=0.0, shares=[1.0],
                                         sizes=[1]),
                         lineage=Lineage(topic="t"))
    assert ModelBundle.from_json(bundle.to_json()).features.kind_of("tenure_days") == "other"
    for kinds in ({"tenure_days": "age"}, {"not_a_feature": "count"}):
        tampered = bundle.to_json().replace('"kinds":{}', '"kinds":' + str(kinds).replace("'", '"'))
        with pytest.raises(BundleError):
            ModelBundle.from_json(tampered)
