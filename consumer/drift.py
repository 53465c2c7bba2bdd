"""Streaming quality signals, computed from numbers the scoring step already has.

* simplified silhouette per event (nearest vs second-nearest centroid), averaged over the last
  ``window_events`` events;
* a true silhouette on a sample of the same recent events, recomputed every ``every_s``, and its
  drift from the accepted baseline (``segmentation.baseline``);
* segment shares over the window and their PSI against the training shares;
* the novelty share: of the same window, the events farther from their centroid than their
  segment's training 99th percentile (about 1% while the data is the training data's; a new
  population far from every segment raises it);
* centroid drift: online centroid vs published centroid, in scaled units, and how many online
  centroids crossed into another segment.
"""

from __future__ import annotations

import time
from collections import deque

import numpy as np

from consumer.model import ActiveModel
from consumer.online import OnlineKMeans
from segmentation.baseline import baseline_of
from segmentation.cluster_metrics import population_stability_index, sampled_silhouette, simplified_silhouette


class RecentSample:
    """A uniform sample of about ``size`` of the last ``window`` events: each event is kept with
    probability ``size / window`` in a ring buffer, so old events age out and the sample
    follows drift (a classic reservoir over the whole stream would dilute it for ever).

    >>> r = RecentSample(3, 3, seed=0)
    >>> r.add(np.arange(10.0).reshape(5, 2), np.arange(5))
    >>> r.rows().tolist(), r.row_labels().tolist()
    ([[4.0, 5.0], [6.0, 7.0], [8.0, 9.0]], [2, 3, 4])
    """

    def __init__(self, size: int, window: int, seed: int = 0) -> None:
        self.size = size
        self.keep = min(1.0, size / window)
        self.x: np.ndarray | None = None
        self.labels = np.empty(size, dtype=np.intp)
        self.filled = 0
        self.next = 0
        self.rng = np.random.default_rng(seed)

    def add(self, x: np.ndarray, labels: np.ndarray) -> None:
        if self.x is None:
            self.x = np.empty((self.size, x.shape[1]))
        kept = np.flatnonzero(self.rng.random(x.shape[0]) < self.keep)
        for i in kept[-self.size:]:
            self.x[self.next], self.labels[self.next] = x[i], labels[i]
            self.next = (self.next + 1) % self.size
            self.filled = min(self.filled + 1, self.size)

    def rows(self) -> np.ndarray:
        return np.empty((0, 0)) if self.x is None else self.x[: self.filled]

    def row_labels(self) -> np.ndarray:
        return self.labels[: self.filled]


# Fewer events than this in the window give no novelty share: at the normal 1%, 500 events
# put a share above 3% at odds of about 1 in 10,000, while 100 events would reach it 2% of the
# time.
MIN_NOVELTY_EVENTS = 500


class DriftTracker:
    """Per model version: reset whenever the model is swapped (the space changes)."""

    def __init__(
        self, model: ActiveModel, window_events: int = 5000, sample: int = 1000,
        every_s: float = 15.0,
    ) -> None:
        self.model = model
        self.window_events = window_events
        self.every_s = every_s
        self._batches: deque[tuple[float, np.ndarray, int]] = deque()  # silhouettes, counts, novel
        self._in_window = 0
        self.sample = RecentSample(sample, window_events)
        self._next_sampled = time.monotonic() + every_s / 3
        self.sampled: float | None = None

    def update(
        self, indices: np.ndarray, d1: np.ndarray, d2: np.ndarray, x: np.ndarray,
        novel: np.ndarray | None = None,
    ) -> None:
        if indices.shape[0] == 0:
            return
        s = simplified_silhouette(d1, d2)
        counts = np.bincount(indices, minlength=self.model.bundle.k)
        self._batches.append((float(s.sum()), counts, 0 if novel is None else int(novel.sum())))
        self._in_window += indices.shape[0]
        while self._in_window - int(self._batches[0][1].sum()) >= self.window_events:
            self._in_window -= int(self._batches.popleft()[1].sum())
        self.sample.add(x, indices)

    def simplified(self) -> float | None:
        if not self._in_window:
            return None
        return sum(b[0] for b in self._batches) / self._in_window

    def shares(self) -> np.ndarray:
        counts = sum((b[1] for b in self._batches), np.zeros(self.model.bundle.k))
        return counts / max(counts.sum(), 1.0)

    def novelty_share(self) -> float | None:
        """Share of the window's events beyond their segment's training 99th percentile; None
        for a model without radii, or before the window holds ``MIN_NOVELTY_EVENTS``."""
        if self.model.radius_p99 is None or self._in_window < MIN_NOVELTY_EVENTS:
            return None
        return sum(b[2] for b in self._batches) / self._in_window

    def psi(self) -> float:
        return population_stability_index(self.shares(), np.asarray(self.model.bundle.quality.shares))

    def sampled_silhouette(self, force: bool = False) -> float | None:
        """True silhouette on the recent sample, recomputed at most every ``every_s`` seconds."""
        now = time.monotonic()
        if (force or now >= self._next_sampled) and self.sample.filled >= 50:
            self._next_sampled = now + self.every_s
            self.sampled = sampled_silhouette(
                self.sample.rows(), self.sample.row_labels(), self.sample.size, 0
            )
        return self.sampled

    @property
    def baseline(self) -> float:
        """The silhouette drift is measured from: the last accepted model's training silhouette,
        which the bundle carries. A forced publish does not move it, so a collapsed model forced
        live keeps reading a negative drift instead of becoming its own yardstick."""
        return baseline_of(self.model.bundle).silhouette

    def drift(self) -> float | None:
        sampled = self.sampled
        return None if sampled is None else sampled - self.baseline


def centroid_drift(model: ActiveModel, online: OnlineKMeans) -> np.ndarray:
    """Distance of each online centroid from its published centroid (scaled units)."""
    return np.linalg.norm(online.centroids - model.centroids, axis=1)


def crossed_centroids(online: np.ndarray, published: np.ndarray) -> int:
    """How many online centroids are nearer another segment's published centroid than their own:
    the segments they stand for are moving into each other. Index j of the online model stays
    segment j (it never renames, and it never scores); a crossing is counted and alerted.

    >>> published = np.array([[0.0], [10.0], [20.0]])
    >>> crossed_centroids(np.array([[1.0], [9.0], [21.0]]), published)
    0
    >>> crossed_centroids(np.array([[7.0], [4.0], [21.0]]), published)
    2
    """
    distances = np.linalg.norm(online[:, None, :] - published[None, :, :], axis=2)
    return int((distances.argmin(axis=1) != np.arange(online.shape[0])).sum())
