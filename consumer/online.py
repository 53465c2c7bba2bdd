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
from sklearn import config_context
from sklearn.cluster import MiniBatchKMeans
from threadpoolctl import ThreadpoolController

# In the scaled space a unit is one standard deviation of the training window: a point farther
# than this from every centre is an outlier, not drift (a drifting segment moves a few units).
# The bundle's own outlier radii (scoring's ``outliers``) are tighter; this bound holds for a
# bundle without them too.
OUTLIER_DISTANCE = 50.0


class OnlineKMeans:
    """Warm-started from the published centroids; index j stays tied to segment j because
    ``reassignment_ratio=0`` forbids scikit-learn from re-seeding empty centres.

    >>> model = OnlineKMeans(np.array([[0.0], [10.0]]), np.array([0.5, 0.5]), half_life_events=10)
    >>> for _ in range(20):
    ...     _ = model.learn(np.array([[2.0], [2.0], [10.0], [10.0]]))
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
        # One thread for scikit-learn's OpenMP and BLAS pools: a batch of a few hundred rows
        # gains nothing from a second thread, and on a small machine the workers spin against
        # librdkafka's threads (measured on 2 cores with both busy: 91 ms per partial_fit of 500
        # rows with 2 OpenMP threads, 12 ms with one, 0.5 ms when idle). The first partial_fit
        # must run under the limit too: it fixes the model's thread count for every later call.
        self._threads = ThreadpoolController()
        # The first partial_fit initialises the centres; fitting the centres themselves
        # leaves each exactly where it was published.
        with self._threads.limit(limits=1):
            self.model.partial_fit(centroids)
        # Prior weight: as if each centre had absorbed its training share of one half-life of
        # events (a plain model gets the same prior so that the two are comparable).
        prior = np.asarray(shares, dtype=np.float64) * (half_life_events or 5000.0)
        self.model._counts[:] = np.maximum(prior, 1.0)  # noqa: SLF001 - see module docstring
        self.events_seen = 0
        self.events_left_out = 0  # outliers: scored and delivered, never learned

    def learn(
        self, x: np.ndarray, nearest: np.ndarray | None = None, outliers: np.ndarray | None = None,
    ) -> int:
        """Learn a batch, leaving out the rows scoring flagged as ``outliers`` and, whatever the
        bundle says, rows farther than ``OUTLIER_DISTANCE`` from every centre (``nearest``, the
        distances scoring already has): one absurd but valid event must not drag a centre across
        the space. Returns how many rows were left out.

        >>> model = OnlineKMeans(np.array([[0.0], [10.0]]), np.array([0.5, 0.5]), half_life_events=10)
        >>> x = np.array([[1.0], [1e6]])
        >>> model.learn(x, nearest=np.abs(x - np.array([[0.0]])).ravel()), float(model.centroids[0, 0]) < 1
        (1, True)
        >>> model.learn(np.array([[-9.0], [1.0]]), outliers=np.array([True, False]))
        1
        >>> float(model.centroids[0, 0]) > 0  # the flagged row was not learned
        True
        """
        keep = learnable(x.shape[0], nearest, outliers)
        skipped = int(x.shape[0] - keep.sum())
        self.events_left_out += skipped
        if skipped:
            x = x[keep]
        if x.shape[0] == 0:
            return skipped
        if self.half_life_events is not None:
            self.model._counts *= 0.5 ** (x.shape[0] / self.half_life_events)  # noqa: SLF001
        # The rows are the encoded batch scoring already checked (finite, the model's width) and
        # the parameters were validated at construction: scikit-learn's per-call checks are
        # skipped, the larger part of a call's cost on a batch of a few hundred rows.
        unchecked = config_context(assume_finite=True, skip_parameter_validation=True)
        with self._threads.limit(limits=1), unchecked:
            self.model.partial_fit(x)
        self.events_seen += x.shape[0]
        return skipped

    @property
    def centroids(self) -> np.ndarray:
        return self.model.cluster_centers_

    @property
    def counts(self) -> np.ndarray:
        return self.model._counts  # noqa: SLF001


def learnable(n: int, nearest: np.ndarray | None, outliers: np.ndarray | None) -> np.ndarray:
    """Which of ``n`` scored rows the online model may learn: neither flagged an outlier nor
    beyond ``OUTLIER_DISTANCE`` of every centre.

    >>> learnable(3, np.array([1.0, 60.0, 2.0]), np.array([False, False, True])).tolist()
    [True, False, False]
    >>> learnable(2, None, None).tolist()
    [True, True]
    """
    keep = np.ones(n, dtype=bool)
    if nearest is not None:
        keep &= nearest <= OUTLIER_DISTANCE
    if outliers is not None:
        keep &= ~outliers
    return keep
