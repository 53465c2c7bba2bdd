"""The K-selection table: for each dataset, the K the trainer chooses and how well its segments
match the truth, against plain ``StandardScaler`` + ``KMeans(n_init=10)`` told the true K.

"Default pipeline" is the trainer's own code path, ``trainer.pipeline.fit_window``, with the
default settings and ``k = null``: the same preprocessing (log, clipping, scaler), the same fits
and the same choice of K as a deployment gets.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score
from sklearn.preprocessing import StandardScaler

from quality.datasets import Dataset
from segmentation.events import CustomerEvent
from segmentation.settings import Settings
from trainer.fit import Fit, plausible
from trainer.pipeline import fit_window
from trainer.window import Window

# K-selection targets of issue 10.
K_RIGHT_TARGET = 0.8


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
    events = [CustomerEvent(customer_id=f"c-{i}", event_time=0,
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


def pipeline_ari_at(dataset: Dataset, settings: Settings) -> float:
    _, _, fit, _ = fit_window(settings, window_of(dataset.rows, dataset.features))
    return float(adjusted_rand_score(dataset.truth, fit.labels))


def k_row(dataset: Dataset, base: Settings) -> KRow:
    settings = choosing_settings(dataset, base)
    started = time.monotonic()
    spec, _, fit, fits = fit_window(settings, window_of(dataset.rows, dataset.features))
    seconds = time.monotonic() - started
    return KRow(
        name=dataset.name, kind=dataset.kind, rows=dataset.rows.shape[0], true_k=dataset.true_k,
        chosen_k=fit.k, silhouette_k=best_k(fits, lambda f: f.silhouette),
        calinski_harabasz_k=best_k(fits, lambda f: f.calinski_harabasz),
        davies_bouldin_k=best_k(fits, lambda f: -f.davies_bouldin),
        plausible_ks=tuple(f.k for f in plausible(fits)),
        ari_default=float(adjusted_rand_score(dataset.truth, fit.labels)),
        ari_true_k=pipeline_ari_at(dataset, settings.model_copy(update={"k": dataset.true_k})),
        ari_plain=plain_kmeans_ari(dataset, settings.random_state),
        logged=tuple(spec.log_features), seconds=seconds,
    )


def k_table(datasets: list[Dataset], base: Settings) -> list[KRow]:
    return [k_row(d, base) for d in datasets]


def share_right(rows: list[KRow]) -> float:
    """Share of the rows where the chosen K is the true K.

    >>> row = KRow("a", "synthetic", 10, 3, 3, 2, 3, 2, (2, 3), 1.0, 1.0, 1.0, (), 0.1)
    >>> share_right([row, row.__class__(**{**row.__dict__, "chosen_k": 4})])
    0.5
    """
    return sum(r.k_right for r in rows) / max(len(rows), 1)
