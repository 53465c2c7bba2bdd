"""Online K-Means between retrains: scikit-learn's ``MiniBatchKMeans.partial_fit`` with forgetting.

``partial_fit`` moves centre j towards a batch with learning rate ``n_j / (N_j + n_j)`` where
``N_j`` (``_counts``) is every weight the centre has ever absorbed. ``N_j`` never decays, so
after a while plain ``partial_fit`` stops moving: it cannot follow drift. Like Spark
StreamingKMeans' decay factor with ``timeUnit=points``, the counts are multiplied by
``0.5 ** (n / half_life_events)`` before each batch of ``n`` events: an event's influence on the
centres halves every ``half_life_events`` events seen by this replica.
"""

from __future__ import annotations

import numpy as np
from sklearn.cluster import MiniBatchKMeans


class OnlineKMeans:
    """Warm-started from the published centroids; index j stays tied to segment j because
    ``reassignment_ratio=0`` forbids scikit-learn from re-seeding empty centres.

    >>> model = OnlineKMeans(np.array([[0.0], [10.0]]), np.array([0.5, 0.5]), half_life_events=10)
    >>> for _ in range(20):
    ...     model.learn(np.array([[2.0], [2.0], [10.0], [10.0]]))
    >>> round(float(model.centroids[0, 0]), 1), float(model.centroids[1, 0])
    (2.0, 10.0)
    """

    def __init__(
        self,
        centroids: np.ndarray,
        shares: np.ndarray,
        half_life_events: float | None,
        random_state: int = 0,
    ) -> None:
        k = centroids.shape[0]
        self.half_life_events = half_life_events
        self.model = MiniBatchKMeans(
            n_clusters=k, init=centroids, n_init=1, reassignment_ratio=0.0,
            batch_size=max(k, 256), random_state=random_state,
        )
        # The first partial_fit initialises the centres; fitting the centres themselves
        # leaves each exactly where it was published.
        self.model.partial_fit(centroids)
        # Prior weight: as if each centre had absorbed its training share of one half-life of
        # events (a plain model gets the same prior so that the two are comparable).
        prior = np.asarray(shares, dtype=np.float64) * (half_life_events or 5000.0)
        self.model._counts[:] = np.maximum(prior, 1.0)  # noqa: SLF001 - see module docstring
        self.events_seen = 0

    def learn(self, x: np.ndarray) -> None:
        if x.shape[0] == 0:
            return
        if self.half_life_events is not None:
            self.model._counts *= 0.5 ** (x.shape[0] / self.half_life_events)  # noqa: SLF001
        self.model.partial_fit(x)
        self.events_seen += x.shape[0]

    @property
    def centroids(self) -> np.ndarray:
        return self.model.cluster_centers_

    @property
    def counts(self) -> np.ndarray:
        return self.model._counts  # noqa: SLF001
