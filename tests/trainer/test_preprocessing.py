"""Preprocessing for real money data: heavy tails get a log chosen from the
data, refunds keep their sign, a few absurd rows are clipped, and the consumer applies exactly
what the trainer fitted.

Offline and fast: the trainer's own ``fit_numeric`` / ``encode_window`` and ``fit_kmeans`` at the
true K, against plain ``StandardScaler`` + ``KMeans(n_init=10)`` on the same rows.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score
from sklearn.preprocessing import StandardScaler

from consumer.model import ActiveModel
from consumer.scoring import score_batch
from quality.k_table import window_of
from segmentation.bundle import Lineage, ModelBundle, Quality
from segmentation.features import FeatureConfig, FeatureSpec, fit_numeric
from segmentation.settings import Settings
from tests.support.messages import NOW_MS, SMALL_RULES, Msg
from trainer.fit import fit_kmeans
from trainer.pipeline import encode_window

SETTINGS = Settings()  # the defaults: what a deployment gets
K = 5
SEEDS = range(5)


def default_pipeline(raw: np.ndarray, log_features: tuple[str, ...] = ()) -> tuple[FeatureSpec, np.ndarray]:
    """The trainer's preprocessing with the default settings, then its K-Means at the true K."""
    names = [f"f{i}" for i in range(raw.shape[1])]
    config = FeatureConfig.of(SETTINGS.model_copy(update={"features": tuple(names)}))
    spec = fit_numeric(raw, replace(config, log_features=log_features))
    fit = fit_kmeans(spec.encode_numeric(raw), K, SETTINGS.n_init, 0, SETTINGS.silhouette_sample)
    return spec, fit.labels


def plain_kmeans(raw: np.ndarray) -> np.ndarray:
    return KMeans(K, n_init=10, random_state=0).fit_predict(StandardScaler().fit_transform(raw))


def lognormal_spend(seed: int, n: int = 400, d: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Five populations whose typical spends lie between 5 and 5,000, each spread
    multiplicatively (lognormal, sigma 0.5): the shape of real per-customer money features."""
    rng = np.random.default_rng(seed)
    means = np.exp(rng.uniform(np.log(5), np.log(5000), size=(K, d)))
    raw = np.vstack([means[j] * rng.lognormal(0, 0.5, size=(n, d)) for j in range(K)])
    return raw, np.repeat(np.arange(K), n)


def with_absurd_rows(
    seed: int, n: int = 400, d: int = 4, fraction: float = 0.003
) -> tuple[np.ndarray, np.ndarray]:
    """Five Gaussian populations; 0.3% of rows have one feature at 1e9 (inside the default
    input bound of 1e12): valid customers with one absurd value, still of their population."""
    rng = np.random.default_rng(seed)
    means = rng.uniform(0, 100, size=(K, d))
    raw = np.vstack([means[j] + rng.normal(0, 3, size=(n, d)) for j in range(K)])
    rows = rng.choice(raw.shape[0], int(fraction * raw.shape[0]), replace=False)
    raw[rows, rng.integers(0, d, rows.shape[0])] = 1e9
    return raw, np.repeat(np.arange(K), n)


def test_heavy_tailed_spend_is_logged_automatically_and_segments_better_than_plain_kmeans() -> None:
    ours, plain = [], []
    for seed in SEEDS:
        raw, truth = lognormal_spend(seed)
        spec, labels = default_pipeline(raw)
        assert spec.log_features, "no feature chosen for the log on lognormal spend"
        ours.append(adjusted_rand_score(truth, labels))
        plain.append(adjusted_rand_score(truth, plain_kmeans(raw)))
    assert min(ours) >= 0.95, ours
    assert np.mean(ours) > np.mean(plain), (ours, plain)


def test_a_gaussian_feature_is_not_logged() -> None:
    rng = np.random.default_rng(0)
    raw = np.column_stack([rng.normal(50, 5, 3000), rng.lognormal(3, 1, 3000)])
    spec = fit_numeric(raw, FeatureConfig(("age", "spend"), log_skewness=SETTINGS.log_skewness,
                                          clip_quantile=SETTINGS.clip_quantile,
                                          clip_margin=SETTINGS.clip_margin))
    assert spec.log_features == ["spend"]


def test_a_few_absurd_rows_neither_stretch_the_scaler_nor_take_a_segment() -> None:
    for seed in SEEDS:
        raw, truth = with_absurd_rows(seed)
        spec, labels = default_pipeline(raw)
        ours = adjusted_rand_score(truth, labels)
        assert ours >= 0.98, (seed, ours)
        assert ours >= adjusted_rand_score(truth, plain_kmeans(raw)), seed
        assert spec.clip_high is not None and max(spec.clip_high) < 1e3


def test_refunds_keep_their_sign_under_the_log() -> None:
    """Net spend of refunders (about -300), non-buyers (0) and buyers (about +300), each spread
    multiplicatively: the old ``log1p(max(x, 0))`` folded every refund onto 0, merging the
    refunders with the non-buyers."""
    rng = np.random.default_rng(3)
    net = np.concatenate([-rng.lognormal(np.log(300), 0.3, 500), np.zeros(500),
                          rng.lognormal(np.log(300), 0.3, 500)])
    truth = np.repeat(np.arange(3), 500)
    spec = fit_numeric(net[:, None], FeatureConfig(("net_spend",), log_features=("net_spend",),
                                                   clip_quantile=SETTINGS.clip_quantile,
                                                   clip_margin=SETTINGS.clip_margin))
    labels = KMeans(3, n_init=10, random_state=0).fit_predict(spec.encode_numeric(net[:, None]))
    assert adjusted_rand_score(truth, labels) >= 0.99
    back = spec.to_raw_numeric(spec.encode_numeric(np.array([[-300.0], [300.0]])))
    assert back.round(6).tolist() == [[-300.0], [300.0]]


def test_the_consumer_assigns_every_event_as_the_trainer_did_through_a_bundle_round_trip() -> None:
    """The log choice and the clip bounds travel in the bundle: the consumer's ``score_batch``
    on the training events (absurd rows included) gives the trainer's own labels."""
    raw, _ = with_absurd_rows(1, n=60, d=2)
    names = ("a", "b")  # the input contract of tests.support.messages.SMALL_RULES
    settings = SETTINGS.model_copy(
        update={"features": tuple(names), "categorical": (), "log_features": ("b",)})
    window = window_of(raw, names)
    spec, x = encode_window(FeatureConfig.of(settings), window)
    assert spec.log_features == ["b"] and spec.clip_low is not None
    fit = fit_kmeans(x, K, 3, 0, 1000)
    bundle = ModelBundle(
        version=1, features=spec, centroids=fit.centroids.tolist(), segment_ids=list(range(K)),
        segment_names=[f"s{j}" for j in range(K)],
        quality=Quality(silhouette=fit.silhouette, davies_bouldin=fit.davies_bouldin,
                        inertia=fit.inertia, shares=fit.shares.tolist(), sizes=fit.sizes),
        lineage=Lineage(topic="t"),
    )
    model = ActiveModel.of(ModelBundle.from_json(bundle.to_json()))
    messages = [Msg(json.dumps({"customer_id": e.customer_id, "event_time": NOW_MS,
                                "event_id": f"e-{i}", "features": e.features}).encode(), _offset=i)
                for i, e in enumerate(window.events)]
    batch = score_batch(messages, model, SMALL_RULES, NOW_MS)
    assert not batch.dead_letters
    assigned = [json.loads(r.value or b"")["segment_id"] for r in batch.outputs]
    assert assigned == fit.labels.tolist()


@pytest.mark.parametrize("window", ["gaussian", "lognormal"])
def test_an_ordinary_window_is_not_changed_by_clipping(window: str) -> None:
    """Clipping moves only values beyond the widened quantile range: none in a clean window
    (the lognormal one after its automatic log)."""
    raw, _ = with_absurd_rows(0, fraction=0.0) if window == "gaussian" else lognormal_spend(0)
    spec = fit_numeric(raw, FeatureConfig(tuple(f"f{i}" for i in range(4)),
                                          log_skewness=SETTINGS.log_skewness,
                                          clip_quantile=SETTINGS.clip_quantile,
                                          clip_margin=SETTINGS.clip_margin))
    assert spec.clip_low is not None
    unclipped = spec.model_copy(update={"clip_low": None, "clip_high": None})
    assert np.array_equal(spec.encode_numeric(raw), unclipped.encode_numeric(raw))
