"""The K-selection table: for each dataset, the K the trainer chooses and how well its segments
match the truth, against plain ``StandardScaler`` + ``KMeans(n_init=10)`` told the true K.

"Default pipeline" is the trainer's own code path (``trainer.pipeline.encode_window``, the rows
inside the training envelope, ``fit_encoded``) with the default settings and ``k = null``: the
same preprocessing (log by kind and skewness, clipping, scaler), the same fits and the same
choice of K as a deployment gets. Rows outside the envelope are assigned to their nearest
segment, as the consumer does, for the comparison with the truth.

The realistic table (``quality/realistic.py``) puts each set next to plain log-KMeans told the
true K (signed log1p on every feature, winsorized at the 0.5% quantiles, standardised,
``KMeans(n_init=10)``) and a supervised ceiling (gradient boosting, 5-fold cross-validated
predictions, on the same raw features).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sklearn.cluster import KMeans
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import adjusted_rand_score
from sklearn.model_selection import cross_val_predict
from sklearn.preprocessing import StandardScaler

from quality.datasets import Dataset
from segmentation.cluster_metrics import nearest_two
from segmentation.events import DecodedEvent, Event
from segmentation.features import FeatureConfig, FeatureSpec, log_transform
from segmentation.settings import Settings
from trainer.__main__ import k_config
from trainer.fit import MIN_STABILITY, Fit, plausible
from trainer.pipeline import encode_window, fit_encoded, inside_envelope
from trainer.window import Window

# K-selection targets.
K_RIGHT_TARGET = 0.8
REALISTIC_ARI_TARGET = 0.70  # mean ARI of automatic K on the realistic family
REALISTIC_OF_LOG_KMEANS = 0.9  # and at least this share of plain log-KMeans' at the true K
WITHIN_ONE_TARGET = 0.8  # share of realistic sets with K within +-1 of the truth


@dataclass(frozen=True)
class KRow:
    name: str
    kind: str
    rows: int
    true_k: int
    chosen_k: int  # the trainer's choice
    silhouette_k: int  # the silhouette's maximum alone (what the criterion before leaned to)
    calinski_harabasz_k: int  # Calinski-Harabasz's maximum alone
    davies_bouldin_k: int  # Davies-Bouldin's minimum alone
    plausible_ks: tuple[int, ...]  # the K within the silhouette band
    ari_default: float  # the default pipeline, K chosen
    ari_true_k: float  # the default pipeline told the true K (preprocessing without K selection)
    ari_plain: float  # StandardScaler + KMeans(n_init=10) at the true K
    logged: tuple[str, ...]  # features the pipeline gave the log
    seconds: float

    @property
    def k_right(self) -> bool:
        return self.chosen_k == self.true_k

    @property
    def at_least_plain(self) -> bool:
        return self.ari_default >= self.ari_plain


def window_of(rows: np.ndarray, names: tuple[str, ...]) -> Window:
    """A training window of one event per row, as the trainer reads it from the topic.

    >>> w = window_of(np.array([[1.0, 2.5]]), ("a", "b"))
    >>> w.events[0].features
    {'a': 1.0, 'b': 2.5}
    """
    events: list[Event] = [DecodedEvent(customer_id=f"c-{i}", event_ms=0,
                                        features=dict(zip(names, row, strict=True)))
              for i, row in enumerate(rows.tolist())]
    return Window(events=events, ranges=[], start_ms=0, end_ms=0)


def choosing_settings(dataset: Dataset, base: Settings) -> Settings:
    """``base`` (the defaults, or the environment's) with this dataset's features and K chosen."""
    return base.model_copy(update={"features": dataset.features, "categorical": (), "k": None,
                                   "log_features": ()})


def best_k(fits: list[Fit], score: Callable[[Fit], float]) -> int:
    """The K with the highest ``score`` (ties: the smaller K).

    >>> z = np.zeros((1, 1)); l = np.zeros(1, dtype=int)
    >>> best_k([Fit(z, l, 2, 1.0, 0.5, 0.9), Fit(z, l, 3, 1.0, 0.6, 0.4)], lambda f: -f.davies_bouldin)
    3
    """
    return max(fits, key=lambda f: (score(f), -f.k)).k


def plain_kmeans_ari(dataset: Dataset, random_state: int) -> float:
    x = StandardScaler().fit_transform(dataset.rows)
    labels = KMeans(dataset.true_k, n_init=10, random_state=random_state).fit_predict(x)
    return float(adjusted_rand_score(dataset.truth, labels))


@dataclass(frozen=True)
class PipelineRun:
    spec: FeatureSpec
    fit: Fit
    fits: list[Fit]
    labels: np.ndarray  # every row's segment, rows outside the envelope included
    outside: int  # rows left out of the fit
    seconds: float


def run_pipeline(dataset: Dataset, settings: Settings) -> PipelineRun:
    """The trainer's path on one window: preprocessing, the rows inside the envelope, the fit."""
    window = window_of(dataset.rows, dataset.features)
    started = time.monotonic()
    spec, x = encode_window(FeatureConfig.of(settings), window)
    events, inside = inside_envelope(spec, window.events, x)
    fit, fits = fit_encoded(k_config(settings), inside)
    seconds = time.monotonic() - started
    labels, _, _ = nearest_two(x, fit.centroids)
    return PipelineRun(spec, fit, fits, labels, len(window.events) - len(events), seconds)


def pipeline_ari_at(dataset: Dataset, settings: Settings) -> float:
    return float(adjusted_rand_score(dataset.truth, run_pipeline(dataset, settings).labels))


def k_row(dataset: Dataset, base: Settings) -> KRow:
    settings = choosing_settings(dataset, base)
    run = run_pipeline(dataset, settings)
    fit, fits = run.fit, run.fits
    return KRow(
        name=dataset.name, kind=dataset.kind, rows=dataset.rows.shape[0], true_k=dataset.true_k,
        chosen_k=fit.k, silhouette_k=best_k(fits, lambda f: f.silhouette),
        calinski_harabasz_k=best_k(fits, lambda f: f.calinski_harabasz),
        davies_bouldin_k=best_k(fits, lambda f: -f.davies_bouldin),
        plausible_ks=tuple(f.k for f in plausible(fits)),
        ari_default=float(adjusted_rand_score(dataset.truth, run.labels)),
        ari_true_k=pipeline_ari_at(dataset, settings.model_copy(update={"k": dataset.true_k})),
        ari_plain=plain_kmeans_ari(dataset, settings.random_state),
        logged=tuple(run.spec.log_features), seconds=run.seconds,
    )


@dataclass(frozen=True)
class RealisticRow:
    name: str
    kind: str  # realistic | no structure
    true_k: int
    chosen_k: int
    stable_ks: tuple[int, ...]  # the K whose subsample stability passed
    outside: int  # rows left out of the fit (outside the training envelope)
    ari_default: float  # the default pipeline, K chosen (0 for a no-structure set)
    ari_log_kmeans: float  # plain log-KMeans told the true K
    ari_supervised: float  # the supervised ceiling
    seconds: float

    @property
    def within_one(self) -> bool:
        return abs(self.chosen_k - self.true_k) <= 1


def log_kmeans_labels(rows: np.ndarray, k: int, random_state: int, quantile: float = 0.005) -> np.ndarray:
    """Plain KMeans on winsorized log features: signed log1p on every column, clipped at the
    ``quantile`` and ``1 - quantile`` quantiles, standardised.

    >>> rows = np.vstack([np.full((5, 2), 10.0), np.full((5, 2), 1000.0)])
    >>> log_kmeans_labels(rows, 2, 0).tolist() in ([0] * 5 + [1] * 5, [1] * 5 + [0] * 5)
    True
    """
    x = log_transform(rows, np.ones(rows.shape[1], dtype=bool))
    lo, hi = np.quantile(x, [quantile, 1 - quantile], axis=0)
    x = StandardScaler().fit_transform(np.clip(x, lo, hi))
    return np.asarray(KMeans(k, n_init=10, random_state=random_state).fit_predict(x))


def supervised_ari(dataset: Dataset, random_state: int) -> float:
    """The ceiling: a gradient-boosting classifier's 5-fold cross-validated predictions."""
    if dataset.true_k < 2:
        return 1.0
    model = HistGradientBoostingClassifier(max_iter=100, random_state=random_state)
    predicted = cross_val_predict(model, dataset.rows, dataset.truth, cv=5)
    return float(adjusted_rand_score(dataset.truth, predicted))


def realistic_row(dataset: Dataset, base: Settings) -> RealisticRow:
    settings = choosing_settings(dataset, base)
    run = run_pipeline(dataset, settings)
    structured = dataset.true_k > 1
    return RealisticRow(
        name=dataset.name, kind=dataset.kind, true_k=dataset.true_k, chosen_k=run.fit.k,
        stable_ks=tuple(f.k for f in run.fits if f.stability >= MIN_STABILITY), outside=run.outside,
        ari_default=float(adjusted_rand_score(dataset.truth, run.labels)) if structured else 0.0,
        ari_log_kmeans=float(adjusted_rand_score(
            dataset.truth, log_kmeans_labels(dataset.rows, dataset.true_k, settings.random_state)))
        if structured else 0.0,
        ari_supervised=supervised_ari(dataset, settings.random_state), seconds=run.seconds,
    )


def realistic_table(datasets: list[Dataset], base: Settings) -> list[RealisticRow]:
    return [realistic_row(d, base) for d in datasets]


def k_table(datasets: list[Dataset], base: Settings) -> list[KRow]:
    return [k_row(d, base) for d in datasets]


def share_right(rows: list[KRow]) -> float:
    """Share of the rows where the chosen K is the true K.

    >>> row = KRow("a", "synthetic", 10, 3, 3, 2, 3, 2, (2, 3), 1.0, 1.0, 1.0, (), 0.1)
    >>> share_right([row, row.__class__(**{**row.__dict__, "chosen_k": 4})])
    0.5
    """
    return sum(r.k_right for r in rows) / max(len(rows), 1)
