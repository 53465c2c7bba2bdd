"""Online K-Means between retrains: scikit-learn's ``MiniBatchKMeans.partial_fit`` with forgetting.

``partial_fit`` moves centre j towards a batch with learning rate ``w_j / (W_j + w_j)``, where
``w_j`` is the weight of the batch's rows nearest to it and ``W_j`` every weight it has ever
absorbed. ``W_j`` never decays, so after a while plain ``partial_fit`` stops moving: it cannot
follow drift. Like Spark StreamingKMeans' decay factor with ``timeUnit=points``, an event's
influence on the centres halves every ``half_life_events`` events seen by this replica.

Only the public API does it: rather than decaying the absorbed weights (scikit-learn keeps them
private), each batch is weighted up by ``2 ** (events learned / half_life_events)`` through
``partial_fit``'s ``sample_weight``, which changes no learning rate (decaying the past by a factor
or weighting the present up by its inverse is the same ratio). The absorbed weights are kept
here too (``counts``, from the same nearest-centre assignment ``partial_fit`` makes), and before
the scale grows past ``RESCALE_AT`` the model starts again from its own centres and counts.
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
RESCALE_AT = 2.0**64  # every 64 half-lives the batch weight starts again from 1


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
        self.half_life_events = half_life_events
        self.random_state = random_state
        # One thread for scikit-learn's OpenMP and BLAS pools: a batch of a few hundred rows
        # gains nothing from a second thread, and on a small machine the workers spin against
        # librdkafka's threads (measured on 2 cores with both busy: 91 ms per partial_fit of 500
        # rows with 2 OpenMP threads, 12 ms with one, 0.5 ms when idle). The first partial_fit
        # must run under the limit too: it fixes the model's thread count for every later call.
        self._threads = ThreadpoolController()
        # Prior weight: as if each centre had absorbed its training share of one half-life of
        # events (a plain model gets the same prior so that the two are comparable).
        prior = np.asarray(shares, dtype=np.float64) * (half_life_events or 5000.0)
        self._start(np.asarray(centroids, dtype=np.float64), np.maximum(prior, 1.0))
        self.events_seen = 0
        self.events_left_out = 0  # outliers: scored and delivered, never learned

    def _start(self, centroids: np.ndarray, absorbed: np.ndarray) -> None:
        """A model whose centres are ``centroids``, each having absorbed the weight ``absorbed``:
        its first ``partial_fit`` is of the centres themselves, so weighted (each row is nearest
        to its own centre, which therefore stays where it is)."""
        k = centroids.shape[0]
        self.model = MiniBatchKMeans(
            n_clusters=k, init=centroids, n_init=1, reassignment_ratio=0.0,
            batch_size=max(k, 256), compute_labels=False,
            # an instance, not the seed: every partial_fit makes a RandomState of a seed (about
            # 100 us, a third of a call on a batch of 500); with no reassignment it draws nothing
            random_state=np.random.RandomState(self.random_state),
        )
        with self._threads.limit(limits=1):
            self.model.partial_fit(centroids, sample_weight=absorbed)
        self._absorbed = absorbed.astype(np.float64)  # in units of ``_scale``
        self._scale = 1.0  # the weight of one event learned now

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
            self._scale *= 2.0 ** (x.shape[0] / self.half_life_events)
            if self._scale > RESCALE_AT:
                self._start(self.centroids.copy(), self._absorbed / self._scale)
        # the assignment partial_fit makes: each row to its nearest centre before the step
        nearest_centre = nearest_centres(x, self.model.cluster_centers_)
        # The rows are the encoded batch scoring already checked (finite, the model's width) and
        # the parameters were validated at construction: scikit-learn's per-call checks are
        # skipped, the larger part of a call's cost on a batch of a few hundred rows.
        unchecked = config_context(assume_finite=True, skip_parameter_validation=True)
        with self._threads.limit(limits=1), unchecked:
            self.model.partial_fit(x, sample_weight=np.full(x.shape[0], self._scale))
        self._absorbed += np.bincount(nearest_centre, minlength=self._absorbed.shape[0]) * self._scale
        self.events_seen += x.shape[0]
        return skipped

    @property
    def centroids(self) -> np.ndarray:
        return self.model.cluster_centers_

    @property
    def counts(self) -> np.ndarray:
        """The weight each centre has absorbed, in events, the older ones decayed."""
        return self._absorbed / self._scale


def nearest_centres(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Per row of ``x``, the index of its nearest centre (``|c|^2 - 2 x.c`` is enough to rank).

    >>> nearest_centres(np.array([[0.0, 0.0], [3.0, 4.0]]), np.array([[0.0, 0.1], [3.0, 3.0]])).tolist()
    [0, 1]
    """
    return np.asarray(np.argmin((centres * centres).sum(axis=1) - 2.0 * (x @ centres.T), axis=1))


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
