"""Online K-Means between retrains: scikit-learn's ``MiniBatchKMeans.partial_fit`` step with
forgetting.

``partial_fit`` moves centre j towards a batch with learning rate ``n_j / (N_j + n_j)`` where
``N_j`` (``_counts``) is every weight the centre has ever absorbed. ``N_j`` never decays, so
after a while plain ``partial_fit`` stops moving: it cannot follow drift. Like Spark
StreamingKMeans' decay factor with ``timeUnit=points``, the counts are multiplied by
``0.5 ** (n / half_life_events)`` before each batch of ``n`` events: an event's influence on the
centres halves every ``half_life_events`` events seen by this replica.

The step is scikit-learn's (``_mini_batch_step`` with ``reassignment_ratio=0``: label each row
by its nearest centre, then ``c_j <- (c_j N_j + sum of its rows) / (N_j + n_j)``), written here
in numpy; ``tests/test_throughput.py`` checks it against ``MiniBatchKMeans.partial_fit`` batch
after batch. scikit-learn's own call cost 0.5 ms per 500 rows when the machine was idle, mostly
input validation, and 30-90 ms inside the consumer on 2 cores: its OpenMP workers spun against
librdkafka's threads. This step takes no thread of its own and a few tens of microseconds.
"""

from __future__ import annotations

import numpy as np

# In the scaled space a unit is one standard deviation of the training window: a point farther
# than this from every centre is an outlier, not drift (a drifting segment moves a few units).
OUTLIER_DISTANCE = 50.0


class OnlineKMeans:
    """Warm-started from the published centroids; index j stays tied to segment j because an
    empty centre is never re-seeded (scikit-learn's ``reassignment_ratio=0``).

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
        random_state: int = 0,  # kept for callers: the step draws no random numbers
    ) -> None:
        self.half_life_events = half_life_events
        self.centroids_ = np.array(centroids, dtype=np.float64, copy=True)
        # Prior weight: as if each centre had absorbed its training share of one half-life of
        # events (a plain model gets the same prior so that the two are comparable).
        prior = np.asarray(shares, dtype=np.float64) * (half_life_events or 5000.0)
        self.counts_ = np.maximum(prior, 1.0)
        self.events_seen = 0

    def learn(self, x: np.ndarray, nearest: np.ndarray | None = None) -> int:
        """Learn a batch; rows farther than ``OUTLIER_DISTANCE`` from every centre (``nearest``,
        the distances scoring already has) are left out: one absurd but valid event must not
        drag a centre across the space. Returns how many rows were left out.

        >>> model = OnlineKMeans(np.array([[0.0], [10.0]]), np.array([0.5, 0.5]), half_life_events=10)
        >>> x = np.array([[1.0], [1e6]])
        >>> model.learn(x, nearest=np.abs(x - np.array([[0.0]])).ravel()), float(model.centroids[0, 0]) < 1
        (1, True)
        """
        if nearest is not None:
            keep = nearest <= OUTLIER_DISTANCE
            skipped = int(x.shape[0] - keep.sum())
            x = x[keep]
        else:
            skipped = 0
        if x.shape[0] == 0:
            return skipped
        if self.half_life_events is not None:
            self.counts_ *= 0.5 ** (x.shape[0] / self.half_life_events)
        mini_batch_step(np.asarray(x, dtype=np.float64), self.centroids_, self.counts_)
        self.events_seen += x.shape[0]
        return skipped

    @property
    def centroids(self) -> np.ndarray:
        return self.centroids_

    @property
    def counts(self) -> np.ndarray:
        return self.counts_


def mini_batch_step(x: np.ndarray, centroids: np.ndarray, counts: np.ndarray) -> None:
    """One ``MiniBatchKMeans`` step without reassignment, in place: each row joins its nearest
    centre (squared distances as scikit-learn computes them, first centre on a tie), and each
    centre that got rows moves to the weighted mean of itself (weight ``counts``) and them.

    >>> c, n = np.array([[0.0], [10.0]]), np.array([1.0, 3.0])
    >>> mini_batch_step(np.array([[1.0], [2.0], [8.0]]), c, n)
    >>> c.ravel().tolist(), n.tolist()
    ([1.0, 9.5], [3.0, 4.0])
    """
    distances = np.einsum("ij,ij->i", centroids, centroids)[None, :] - 2.0 * (x @ centroids.T)
    labels = np.argmin(distances, axis=1)
    sizes = np.bincount(labels, minlength=centroids.shape[0])
    for j in np.flatnonzero(sizes).tolist():
        total = counts[j] + sizes[j]
        centroids[j] = (centroids[j] * counts[j] + x[labels == j].sum(axis=0)) * (1.0 / total)
        counts[j] = total
