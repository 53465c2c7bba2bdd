"""The bundle schema's versions: an older bundle is brought up to the current schema by one
explicit migration per version (``segmentation.bundle.migrate``) before anything reads it, and a
newer one is refused, so that no reader falls back on its own."""

from __future__ import annotations

import json
from typing import Any

import pytest

from segmentation.baseline import QualityBaseline, recorded_baseline
from segmentation.bundle import SCHEMA_VERSION, BundleError, ModelBundle
from tests.support.messages import small_bundle


def schema_1(**overrides: Any) -> bytes:
    """A bundle as the schema-1 code wrote it: no baseline, the fit parameters of the time."""
    raw = json.loads(ModelBundle.model_validate(small_bundle()).to_json())
    raw["schema_version"] = 1
    raw["quality"]["gate"] = {}
    raw["lineage"]["params"] = {"n_init": 10, "max_rows": 50_000}
    raw.update(overrides)
    return json.dumps(raw).encode()


def test_a_schema_1_bundle_is_migrated_to_the_current_schema_on_reading() -> None:
    bundle = ModelBundle.from_json(schema_1(version=4))
    assert bundle.schema_version == SCHEMA_VERSION == 2
    params = bundle.lineage.params
    assert [params[k] for k in ("clip_quantile", "vocabulary_max", "vocabulary_min_count")] == [0.0, 1000, 1]
    assert params["k"] == bundle.k and params["scaler"] == bundle.features.scaler
    assert params["feature_kinds"] == bundle.features.kinds and params["n_init"] == 10  # recorded: kept
    # the accepted model of its time: its own figures are the baseline
    own = QualityBaseline(bundle.quality.silhouette, bundle.quality.davies_bouldin, 4)
    assert recorded_baseline(bundle) == own
    again = ModelBundle.from_json(bundle.to_json())
    assert again == bundle  # written back as the current schema, read as it is


def test_a_forced_schema_1_bundle_without_a_baseline_keeps_none() -> None:
    bundle = ModelBundle.from_json(schema_1(forced=True))
    assert recorded_baseline(bundle) is None  # the trainer looks behind it for the accepted one


def test_a_recorded_baseline_survives_the_migration() -> None:
    raw = json.loads(schema_1(forced=True))
    raw["quality"]["gate"] = {"baseline_silhouette": 0.61, "baseline_davies_bouldin": 0.5,
                              "baseline_version": 2}
    bundle = ModelBundle.from_json(json.dumps(raw))
    assert recorded_baseline(bundle) == QualityBaseline(0.61, 0.5, 2)


@pytest.mark.parametrize("version", [SCHEMA_VERSION + 1, 0, "2", True])
def test_a_newer_or_malformed_schema_version_is_refused(version: object) -> None:
    with pytest.raises(BundleError, match="schema_version"):
        ModelBundle.from_json(schema_1(schema_version=version))


@pytest.mark.parametrize("hostile", [
    {"lineage": [1, 2, 3]}, {"lineage": {"params": [1, 2]}}, {"centroids": 5}, {"quality": "x"},
    {"quality": {"gate": [1]}}, {"features": {"kinds": [1]}}, {"lineage": {"params": "x" * 10}},
])
def test_a_schema_1_bundle_of_another_shape_is_refused_never_a_crash(hostile: dict[str, Any]) -> None:
    """A bundle is read back from Redis and the models topic: untrusted. The migration leaves any
    part that is not the object it expects to validation, which refuses it with a reason."""
    with pytest.raises(BundleError, match="invalid bundle"):
        ModelBundle.from_json(schema_1(**hostile))
