"""The model step alone, no I/O, on the same encoded events: assign (nearest of the published
centroids) plus the online update, ours per batch (``nearest_two`` + ``OnlineKMeans.learn``,
i.e. ``MiniBatchKMeans.partial_fit`` with forgetting) vs River's ``cluster.KMeans``
(``learn_one`` + ``predict_one``) per event."""

from __future__ import annotations

import time

import numpy as np

from consumer.online import OnlineKMeans
from segmentation.bundle import ModelBundle
from segmentation.cluster_metrics import nearest_two
from segmentation.events import CustomerEvent


def encoded(bundle: ModelBundle, values: list[bytes]) -> np.ndarray:
    x, _ = bundle.features.encode([CustomerEvent.model_validate_json(v) for v in values])
    return x


def ours(bundle: ModelBundle, x: np.ndarray, batch_size: int = 500) -> float:
    """Events per second."""
    centroids = bundle.centroid_array()
    online = OnlineKMeans(centroids, np.asarray(bundle.quality.shares), 5000.0)
    started = time.perf_counter()
    for i in range(0, x.shape[0], batch_size):
        rows = x[i:i + batch_size]
        _, nearest, _ = nearest_two(rows, centroids)
        online.learn(rows, nearest)
    return x.shape[0] / (time.perf_counter() - started)


def river(bundle: ModelBundle, x: np.ndarray) -> float:
    """Events per second."""
    from river import cluster

    model = cluster.KMeans(n_clusters=bundle.k, halflife=0.5, sigma=3.0, seed=42)
    columns = bundle.features.columns
    rows = [dict(zip(columns, row, strict=True)) for row in x.tolist()]
    started = time.perf_counter()
    for row in rows:
        model.learn_one(row)
        model.predict_one(row)
    return len(rows) / (time.perf_counter() - started)
