"""Random layouts of five well separated customer populations in the demo's six features, and
the windows that test the quality gate: the same populations, a collapse, a merge, a drift, a
replaced population, a tiny segment, absurd values.

Each population is spread 13% around its mean, as the demo producer's customers are
(lognormal(0, 0.12) per customer x lognormal(0, 0.05) per event).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from quality.datasets import TYPICAL, add_outliers

POPULATIONS = 5
PER_POPULATION = 600
RELATIVE_SPREAD = 0.13
TINY_SHARE = 0.005  # a segment at half the gate's default min_share


@dataclass
class Layout:
    means: np.ndarray  # (5, 6)
    spreads: np.ndarray  # (5, 6) standard deviations

    def window(self, rng: np.random.Generator, means: np.ndarray | None = None,
               sizes: list[int] | None = None) -> np.ndarray:
        """``sizes`` (default PER_POPULATION each) customers per population, in population order."""
        means = self.means if means is None else means
        sizes = sizes or [PER_POPULATION] * means.shape[0]
        return np.vstack([rng.normal(m, s, size=(n, m.shape[0]))
                          for m, s, n in zip(means, self.spreads, sizes, strict=True)])

    def collapsed(self, pull: float = 0.3) -> np.ndarray:
        """Centres pulled towards their mean, to ``pull`` of their distance (spreads unchanged)."""
        centre = self.means.mean(axis=0)
        return centre + pull * (self.means - centre)

    def closest_pair(self) -> tuple[int, int]:
        """The two populations closest in their own standard deviations."""
        best, pair = np.inf, (0, 1)
        for a, b in itertools.combinations(range(self.means.shape[0]), 2):
            pooled = np.sqrt((self.spreads[a] ** 2 + self.spreads[b] ** 2) / 2)
            d = float(np.linalg.norm((self.means[a] - self.means[b]) / pooled))
            if d < best:
                best, pair = d, (a, b)
        return pair

    def merged(self) -> np.ndarray:
        """The two closest populations meeting at their midpoint."""
        a, b = self.closest_pair()
        means = self.means.copy()
        means[a] = means[b] = (self.means[a] + self.means[b]) / 2
        return means

    def drifted(self, rng: np.random.Generator, population: int = 2, by: float = 2.0) -> np.ndarray:
        """One population moved by ``by`` of its standard deviations in a random direction."""
        means = self.means.copy()
        direction = rng.normal(size=means.shape[1])
        means[population] += by * self.spreads[population] * direction / np.linalg.norm(direction)
        return means

    def replaced(self, rng: np.random.Generator, population: int = 3) -> np.ndarray:
        """One population gone and a different one 6 of its standard deviations from it (and more
        than 8 from every other)."""
        means = self.means.copy()
        while True:
            direction = rng.normal(size=means.shape[1])
            means[population] = (self.means[population]
                                 + 6.0 * self.spreads[population] * direction / np.linalg.norm(direction))
            gaps = [np.linalg.norm((means[population] - m) / sd)
                    for m, sd in zip(self.means, self.spreads, strict=True)]
            if (means[population] > 0).all() and sorted(gaps)[1] > 8:
                return means

    def tiny_sizes(self, population: int = 4) -> list[int]:
        """Window sizes where one population holds ``TINY_SHARE`` of the customers."""
        others = PER_POPULATION * (POPULATIONS - 1)
        sizes = [PER_POPULATION] * POPULATIONS
        sizes[population] = max(1, round(TINY_SHARE * others / (1 - TINY_SHARE)))
        return sizes

    def with_outliers(self, rng: np.random.Generator) -> np.ndarray:
        """The same populations, 0.3% of the customers with one feature 10^3 to 10^6 times its
        value."""
        return add_outliers(self.window(rng), rng)


def random_means(rng: np.random.Generator, n: int = POPULATIONS) -> np.ndarray:
    return TYPICAL * np.exp(rng.normal(0.0, 0.9, size=(n, TYPICAL.shape[0])))


def random_layout(rng: np.random.Generator) -> Layout:
    means = random_means(rng)
    return Layout(means, RELATIVE_SPREAD * means)


def rows_of(population: int) -> slice:
    """The rows of one population in a window of PER_POPULATION customers each.

    >>> rows_of(2)
    slice(1200, 1800, None)
    """
    return slice(population * PER_POPULATION, (population + 1) * PER_POPULATION)
