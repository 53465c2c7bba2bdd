"""Fast tests of the pure core: contracts, bundle validation, matching, gate, online learning."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from consumer.online import OnlineKMeans
from segmentation.bundle import BundleError, ModelBundle
from segmentation.events import CustomerEvent, json_schema
from segmentation.features import FeatureSpec
from segmentation.settings import Settings
from tests.support.messages import small_bundle
from trainer.__main__ import gate_limits
from trainer.fit import KConfig, fit_model
from trainer.gate import run_gate

ROOT = Path(__file__).resolve().parents[2]


def test_a_valid_bundle_round_trips_through_json() -> None:
    raw = json.dumps(small_bundle())
    assert json.loads(ModelBundle.from_json(raw).to_json()) == json.loads(raw)


@pytest.mark.parametrize(
    "poison",
    [
        {"centroids": [[0, 0, 1], [5, 5, 0]]},  # wrong shape
        {"centroids": [[0, 0, 1, 0], [float("nan"), 5, 0, 1]]},  # NaN
        {"segment_ids": [3, 3]},  # duplicate ids
        {"segment_names": ["only one"]},
        {"version": 0},
        {"schema_version": 99},
    ],
)
def test_a_poisoned_bundle_is_refused_with_a_reason(poison: dict[str, Any]) -> None:
    raw = json.dumps(small_bundle(**poison))  # json.dumps writes a float NaN as the literal NaN
    with pytest.raises(BundleError, match="invalid bundle"):
        ModelBundle.from_json(raw)


def test_pickle_or_garbage_is_not_a_bundle() -> None:
    with pytest.raises(BundleError):
        ModelBundle.from_json(b"\x80\x04\x95garbage")


def test_a_bundle_is_compatible_when_the_contract_requires_every_feature_it_uses() -> None:
    bundle = ModelBundle.model_validate(small_bundle())
    with pytest.raises(BundleError, match="features"):
        bundle.check_compatible(("a", "c"), ("channel",))
    with pytest.raises(BundleError, match="attributes"):
        bundle.check_compatible(("a", "b"), ())
    bundle.check_compatible(("a", "b"), ("channel",))
    bundle.check_compatible(("a", "b", "c"), ("channel", "country"))  # added: the old model still scores


def test_the_committed_json_schema_is_the_generated_one() -> None:
    committed = json.loads((ROOT / "segmentation" / "event.schema.json").read_text())
    assert committed == json_schema(), "run `make schema` and commit segmentation/event.schema.json"


def test_rfc3339_and_epoch_millisecond_event_times_agree() -> None:
    a = CustomerEvent(customer_id="c", event_time="2026-11-29T10:15:00Z", features={})
    b = CustomerEvent(customer_id="c", event_time=a.event_ms, features={})
    assert a.event_ms == b.event_ms


def test_settings_refuse_inconsistent_values() -> None:
    with pytest.raises(ValueError, match="k_min"):
        Settings(k_min=6, k_max=3)
    with pytest.raises(ValueError, match="log_features"):
        Settings(log_features=("nope",))
    with pytest.raises(ValueError):
        Settings(batch_size=0)


def test_reencode_maps_centroids_between_scalers() -> None:
    old = FeatureSpec(numeric=["a"], vocabulary={"ch": ["app", "other"]}, center=[10.0], scale=[2.0])
    new = FeatureSpec(numeric=["a"], vocabulary={"ch": ["app", "web", "other"]},
                      center=[0.0], scale=[4.0])
    moved = new.reencode(np.array([[1.0, 1.0, 0.0]]), old)  # raw a = 12
    assert moved.tolist() == [[3.0, 1.0, 0.0, 0.0]]


def test_quality_gate_refuses_a_collapsed_model() -> None:
    rng = np.random.default_rng(0)
    three = np.vstack([rng.normal(c, 0.3, size=(300, 2)) for c in ((0, 0), (10, 0), (0, 10))])
    fit, _ = fit_model(three, KConfig(5, 2, 8, 4, 0, 2000))  # five segments on three real clusters
    failures = run_gate(fit, three, gate_limits(Settings()))
    assert "separation" in {f.check for f in failures}
    good, _ = fit_model(three, KConfig(3, 2, 8, 4, 0, 2000))
    assert run_gate(good, three, gate_limits(Settings())) == []


@pytest.mark.parametrize("true_k", [3, 4, 5, 6, 7, 8])
def test_k_selection_recovers_the_true_k_on_well_separated_data(true_k: int) -> None:
    rng = np.random.default_rng(true_k)
    centres = rng.uniform(-50, 50, size=(true_k, 4))
    while np.min([np.linalg.norm(a - b) for i, a in enumerate(centres) for b in centres[i + 1:]]) < 15:
        centres = rng.uniform(-50, 50, size=(true_k, 4))
    x = np.vstack([rng.normal(c, 1.0, size=(150, 4)) for c in centres])
    fit, fits = fit_model(x, KConfig(None, 2, 10, 4, 0, 2000))
    assert fit.k == true_k
    assert len(fits) == 9


def test_forgetting_follows_a_shift_that_plain_partial_fit_lags_behind() -> None:
    rng = np.random.default_rng(0)
    start = np.array([[0.0, 0.0], [10.0, 10.0]])
    half_life = 2000.0
    forgetting = OnlineKMeans(start, np.array([0.5, 0.5]), half_life)
    plain = OnlineKMeans(start, np.array([0.5, 0.5]), None)
    # a long stationary period, then segment 0 moves to (3, 0)
    for centre0 in [(0.0, 0.0)] * 100 + [(3.0, 0.0)] * 20:
        batch = np.vstack([rng.normal(centre0, 0.3, (100, 2)), rng.normal((10, 10), 0.3, (100, 2))])
        forgetting.learn(batch)
        plain.learn(batch)
    # 20 batches x 100 events of segment 0 = 2000 events: one half-life
    def moved(m: OnlineKMeans) -> float:
        return float(m.centroids[0, 0]) / 3.0

    assert moved(forgetting) >= 0.5
    assert moved(plain) < 0.25
    assert np.allclose(forgetting.centroids[1], (10, 10), atol=0.2)


def test_consumer_and_trainer_never_import_each_other() -> None:
    for package, forbidden in (("consumer", "trainer"), ("trainer", "consumer")):
        for path in (ROOT / package).glob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                assert not any(n.split(".")[0] == forbidden for n in names), f"{path} imports {forbidden}"


# The composition roots: the processes' entry points, which map the settings to what each component
# reads. The tools (demo, bench, chaos, quality) are entry points of their own.
ROOTS = {"consumer/service.py", "trainer/__main__.py", "segmentation/admin.py", "segmentation/settings.py"}


def test_no_function_outside_the_composition_roots_takes_the_settings() -> None:
    """Components get a small frozen config, or a Protocol of the few settings they read
    (the Kafka and Redis client factories): never the whole ``Settings``."""
    offenders = []
    for package in ("segmentation", "consumer", "trainer"):
        for path in (ROOT / package).rglob("*.py"):
            name = str(path.relative_to(ROOT))
            if name in ROOTS:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    annotations = [a.annotation for a in [*node.args.args, *node.args.kwonlyargs]]
                    names = {n.id for a in annotations if a is not None for n in ast.walk(a)
                             if isinstance(n, ast.Name)}
                    if "Settings" in names:
                        offenders.append(f"{name}: {node.name}")
    assert offenders == []


def test_the_pure_stages_import_no_kafka_redis_or_metrics_client() -> None:
    """Scoring, and the values it returns, can be changed and tested alone: importing them loads
    no I/O client, directly or through what they import."""
    import subprocess
    import sys

    probe = ("import sys, consumer.scoring, consumer.model, segmentation.customer; print(sorted(m for m in "
             "('confluent_kafka', 'redis', 'prometheus_client', 'pydantic_settings') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_a_wrong_setting_stops_the_consumer_with_a_readable_message() -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "SEG_BATCH_SIZE": "0", "SEG_DELIVERY": "maybe"}
    done = subprocess.run([sys.executable, "-m", "consumer"], env=env, capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    assert done.returncode != 0
    assert "SEG_BATCH_SIZE: Input should be greater than or equal to 1" in done.stderr
    assert "SEG_DELIVERY" in done.stderr
    assert "Traceback" not in done.stderr


def test_null_in_the_environment_turns_on_k_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEG_K", "null")
    assert Settings().k is None


def test_k_selection_finds_the_five_demo_segments_with_the_default_categorical_weight() -> None:
    from demo.generator import FEATURES, event_value, make_customers
    from segmentation.features import FeatureConfig, fit_spec

    rng = np.random.default_rng(1)
    people = make_customers(2000, rng)
    events = [CustomerEvent.model_validate(event_value(c, rng, str(i))) for i, c in enumerate(people)]
    spec = fit_spec(events, FeatureConfig(FEATURES, ("channel",),
                                          categorical_weight=Settings().categorical_weight))
    config = KConfig(None, 2, 10, 4, 42, 2000, numeric_columns=len(FEATURES))
    fit, _ = fit_model(spec.encode(events)[0], config)
    assert fit.k == 5


def test_reencode_respects_each_side_s_categorical_weight() -> None:
    old = FeatureSpec(numeric=["a"], vocabulary={"ch": ["app", "other"]}, center=[0.0], scale=[1.0],
                      categorical_weight=1.0)
    new = old.model_copy(update={"categorical_weight": 0.5})
    assert new.reencode(np.array([[2.0, 1.0, 0.0]]), old).tolist() == [[2.0, 0.5, 0.0]]


def test_a_broken_names_file_stops_the_trainer_at_start_with_a_readable_message(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    names = tmp_path / "names.json"
    names.write_text('{"0": ')
    env = {**os.environ, "SEG_NAMES_FILE": str(names)}
    done = subprocess.run([sys.executable, "-m", "trainer", "run"], env=env, capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2
    assert "SEG_NAMES_FILE" in done.stderr and "Traceback" not in done.stderr
