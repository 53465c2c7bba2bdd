"""Changing the feature set without stopping the world: a feature is added by one declaration in
``SEG_FEATURES`` (name, kind, bounds), everything else derives from it, and consumers configured
with it keep scoring with the model from before it until one that uses it is published
(docs/operations.md, "Adding or removing a feature")."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from consumer.model import ActiveModel
from consumer.scoring import ScoringRules, score_batch
from consumer.service import scoring_rules
from segmentation.bundle import BundleError, Lineage, ModelBundle, Quality
from segmentation.events import CustomerEvent
from segmentation.features import FeatureConfig, fit_spec
from segmentation.settings import DEFAULT_FEATURES, Settings
from tests.support.messages import Msg, demo_values

NEW = {"name": "visits_7d", "kind": "count", "bounds": [0, 1000]}


def with_visits(values: list[bytes], visits: Any) -> list[bytes]:
    out = []
    for i, raw in enumerate(values):
        event = json.loads(raw)
        if visits is not None:
            event["features"]["visits_7d"] = visits if not callable(visits) else visits(i)
        out.append(json.dumps(event).encode())
    return out


def bundle_of(settings: Settings, values: list[bytes], version: int) -> ModelBundle:
    """A model fitted on ``values`` with ``settings``' feature set (three centres)."""
    events = [CustomerEvent.model_validate_json(v) for v in values]
    spec = fit_spec(events, FeatureConfig.of(settings))
    x, _ = spec.encode(events)
    centroids = x[np.random.default_rng(0).choice(len(x), 3, replace=False)]
    return ModelBundle(
        version=version, features=spec, centroids=centroids.tolist(), segment_ids=[0, 1, 2],
        segment_names=["a", "b", "c"], lineage=Lineage(topic="events"),
        quality=Quality(silhouette=0.4, davies_bouldin=1.0, inertia=1.0, shares=[0.3, 0.3, 0.4],
                        sizes=[1, 1, 1]),
    )


def rules(settings: Settings) -> ScoringRules:
    return scoring_rules(settings.model_copy(update={"max_event_age_s": 10 * 365 * 86400}))


def test_one_declaration_adds_a_feature_to_the_contract_the_fit_and_the_bundle() -> None:
    settings = Settings(features=[*DEFAULT_FEATURES, NEW])
    assert settings.features == (*DEFAULT_FEATURES, "visits_7d")
    contract = settings.input_contract()
    assert contract.features[-1] == "visits_7d" and contract.bounds["visits_7d"] == (0.0, 1000.0)
    assert FeatureConfig.of(settings).kind_of("visits_7d") == "count"

    values = with_visits(demo_values(600), lambda i: (i * 7) % 40)
    spec = bundle_of(settings, values, 2).features
    assert spec.numeric[-1] == "visits_7d" and spec.kinds["visits_7d"] == "count"
    assert "visits_7d" in spec.log_features  # a count: logged, as its kind says

    scored = score_batch([Msg(v, i) for i, v in enumerate(with_visits(demo_values(3), 5000))],
                         ActiveModel.of(bundle_of(settings, values, 2)), rules(settings))
    assert set(scored.reasons) == {"out_of_range"}  # its bounds are in the contract
    missing = score_batch([Msg(v, i) for i, v in enumerate(demo_values(3))],
                          ActiveModel.of(bundle_of(settings, values, 2)), rules(settings))
    assert set(missing.reasons) == {"missing_feature"}  # and so is the feature itself


def test_consumers_with_the_new_feature_keep_scoring_with_the_model_from_before_it() -> None:
    before, after = Settings(), Settings(features=[*DEFAULT_FEATURES, NEW])
    old = bundle_of(before, demo_values(600), 1)
    old.check_compatible(after.features, after.categorical)  # the model before the feature
    values = with_visits(demo_values(200, seed=9), 3)
    scored = score_batch([Msg(v, i) for i, v in enumerate(values)], ActiveModel.of(old), rules(after))
    assert len(scored.outputs) == 200 and not scored.dead_letters

    new = bundle_of(after, with_visits(demo_values(600), lambda i: i % 30), 2)
    with pytest.raises(BundleError, match="visits_7d"):  # consumers not yet configured refuse it
        new.check_compatible(before.features, before.categorical)


def test_a_declaration_that_cannot_be_read_is_a_clear_settings_error() -> None:
    with pytest.raises(ValueError, match=r"features\[1\] is neither a name nor a declaration \(kind"):
        Settings(features=["recency_days", {"name": "visits_7d", "kind": "visits"}])
    with pytest.raises(ValueError, match="kind count declared, recency in feature_kinds"):
        Settings(features=[{"name": "recency_days", "kind": "count"}],
                 feature_kinds={"recency_days": "recency"})
