"""The trainer's narrow configurations: only its composition root (``trainer/__main__.py``) sees
the settings, and what it builds from them is what the components read."""

from __future__ import annotations

from pathlib import Path

from segmentation.settings import Settings
from trainer.__main__ import train_config, window_config
from trainer.pipeline import fit_params

TRAINER = Path(__file__).resolve().parents[2] / "trainer"

SETTINGS = Settings(
    features=("recency_days", "monetary_90d", "sessions_30d"),
    feature_bounds={"recency_days": (0.0, 3650.0)},
    log_features=("monetary_90d",), max_rows=1234, window_s=900, k=4,
)


def test_only_the_composition_root_sees_the_settings() -> None:
    seeing = sorted(p.name for p in TRAINER.glob("*.py") if "Settings" in p.read_text(encoding="utf-8"))
    assert seeing == ["__main__.py"]


def test_the_window_reads_with_the_consumer_s_input_contract() -> None:
    config = window_config(SETTINGS)
    assert config.contract == SETTINGS.input_contract()
    assert (config.topic, config.window_s, config.max_rows) == ("customer-events", 900, 1234)
    assert config.reader["group.id"] == "segmentation-consumer-trainer"
    assert config.probe["group.id"] == "segmentation-consumer-trainer-probe"


def test_a_recorded_run_s_window_is_read_with_the_contract_of_its_own_features() -> None:
    features = ("recency_days", "frequency_365d")  # one configured (with bounds), one not
    run = window_config(SETTINGS).for_run("old-events", features, 300)
    assert run.contract == SETTINGS.model_copy(update={"features": features}).input_contract()
    assert (run.topic, run.max_rows, run.window_s) == ("old-events", 300, 900)


def test_fit_params_record_the_configured_fit() -> None:
    s = SETTINGS
    assert fit_params(train_config(s), 4) == {
        "k": 4, "n_init": s.n_init, "max_rows": 1234, "scaler": s.scaler,
        "log_features": ["monetary_90d"], "log_skewness": s.log_skewness,
        "clip_quantile": s.clip_quantile, "clip_margin": s.clip_margin,
        "feature_kinds": {"recency_days": "recency", "monetary_90d": "money", "sessions_30d": "count"},
        "categorical_weight": s.categorical_weight, "features": list(s.features),
        "categorical": list(s.categorical), "silhouette_sample": s.silhouette_sample,
        "stability_sample": s.stability_sample, "window_s": 900,
        "vocabulary_max": s.vocabulary_max, "vocabulary_min_count": s.vocabulary_min_count,
    }
