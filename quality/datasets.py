"""The datasets of the K-selection table: scikit-learn's bundled ones (no download) and synthetic
customer data, each with its true labels.

The synthetic sets are drawn so that the truth is unambiguous: populations well apart in the
space a sensible preprocessing gives (within-cluster standard deviations for Gaussian blobs, the
log scale for money), so a K other than the true one is the criterion's mistake, not the data's.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
from sklearn import datasets as bundled

from demo.generator import FEATURES

# Every synthetic kind is drawn with these true K, one seed each.
SYNTHETIC_K = (4, 5, 6)
PER_CLUSTER = 500
DIMENSIONS = 6
OUTLIER_SHARE = 0.003
# A typical customer in the demo's six features (the quality-gate layouts are drawn around it too).
TYPICAL = np.array([12, 8, 400, 50, 15, 600], dtype=np.float64)
MONEY_SIGMA = 0.35  # within-segment spread of the log of each money feature
# Closest pair of centres, in units of the sum of the two clusters' standard deviations.
SEPARATION = 3.0
REFUND_FEATURES = (*FEATURES, "net_spend_90d")


@dataclass(frozen=True)
class Dataset:
    name: str
    kind: str  # bundled | synthetic
    features: tuple[str, ...]
    rows: np.ndarray  # raw feature values, one row per customer
    truth: np.ndarray  # the true segment of each row

    @property
    def true_k(self) -> int:
        return int(np.unique(self.truth).shape[0])


def separated_centres(rng: np.random.Generator, k: int, spreads: np.ndarray, gap: float,
                      box: float) -> np.ndarray:
    """``k`` centres uniform in ``[-box, box]^d``, every pair at least ``gap`` x the sum of the
    two clusters' spreads apart (redrawn until they are).

    >>> c = separated_centres(np.random.default_rng(0), 4, np.ones(4), 3.0, 10.0)
    >>> c.shape, bool(min(np.linalg.norm(a - b) for a, b in itertools.combinations(c, 2)) >= 6)
    ((4, 6), True)
    """
    while True:
        centres = rng.uniform(-box, box, size=(k, DIMENSIONS))
        if all(np.linalg.norm(centres[a] - centres[b]) >= gap * (spreads[a] + spreads[b])
               for a, b in itertools.combinations(range(k), 2)):
            return centres


def gaussian_rows(rng: np.random.Generator, centres: np.ndarray, spreads: np.ndarray,
                  sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows = np.vstack([rng.normal(c, s, size=(n, c.shape[0]))
                      for c, s, n in zip(centres, spreads, sizes, strict=True)])
    return rows, np.repeat(np.arange(len(sizes)), sizes)


def equal_blobs(k: int, rng: np.random.Generator) -> Dataset:
    spreads = np.ones(k)
    rows, truth = gaussian_rows(rng, separated_centres(rng, k, spreads, SEPARATION, 10.0), spreads,
                                np.full(k, PER_CLUSTER))
    return Dataset(f"equal blobs K={k}", "synthetic", axis_names(DIMENSIONS), rows, truth)


def unequal_blobs(k: int, rng: np.random.Generator) -> Dataset:
    """Sizes from 1x to 8x and spreads from 0.5 to 2 (largest clusters not always widest)."""
    sizes = np.round(PER_CLUSTER * np.geomspace(0.25, 2.0, k)).astype(int)
    spreads = rng.permutation(np.geomspace(0.5, 2.0, k))
    rows, truth = gaussian_rows(rng, separated_centres(rng, k, spreads, SEPARATION, 12.0), spreads, sizes)
    return Dataset(f"unequal sizes and spreads K={k}", "synthetic", axis_names(DIMENSIONS), rows, truth)


def anisotropic_blobs(k: int, rng: np.random.Generator) -> Dataset:
    """Blobs stretched by one shared linear map (scikit-learn's "anisotropicly distributed"
    example, in six dimensions): a scaler cannot undo it, and K-Means' round clusters do not fit."""
    spreads = np.ones(k)
    rows, truth = gaussian_rows(rng, separated_centres(rng, k, spreads, SEPARATION, 10.0), spreads,
                                np.full(k, PER_CLUSTER))
    rotation, _ = np.linalg.qr(rng.normal(size=(DIMENSIONS, DIMENSIONS)))
    stretch = np.geomspace(0.4, 2.5, DIMENSIONS)
    return Dataset(f"anisotropic K={k}", "synthetic", axis_names(DIMENSIONS),
                   rows @ (rotation * stretch) @ rotation.T, truth)


def money_centres(rng: np.random.Generator, k: int) -> np.ndarray:
    """Segment centres in log space around a typical customer, at least 6 within-segment
    standard deviations apart."""
    spreads = np.full(k, MONEY_SIGMA)
    while True:
        centres = np.log(TYPICAL) + rng.normal(0.0, 0.9, size=(k, DIMENSIONS))
        if all(np.linalg.norm(centres[a] - centres[b]) >= SEPARATION * (spreads[a] + spreads[b])
               for a, b in itertools.combinations(range(k), 2)):
            return centres


def lognormal_money(k: int, rng: np.random.Generator) -> Dataset:
    """The demo's features, lognormal per segment: heavy right tails as real spend has."""
    rows, truth = money_rows(rng, k)
    return Dataset(f"lognormal money K={k}", "synthetic", FEATURES, rows, truth)


def money_rows(rng: np.random.Generator, k: int) -> tuple[np.ndarray, np.ndarray]:
    log_rows, truth = gaussian_rows(rng, money_centres(rng, k), np.full(k, MONEY_SIGMA),
                                    np.full(k, PER_CLUSTER))
    return np.exp(log_rows), truth


def with_outliers(k: int, rng: np.random.Generator) -> Dataset:
    """Lognormal money with 0.3% of the customers having one feature 10^3 to 10^6 times its
    value (a data-entry or currency error); they keep their true segment."""
    rows, truth = money_rows(rng, k)
    return Dataset(f"lognormal + 0.3% outliers K={k}", "synthetic", FEATURES,
                   add_outliers(rows, rng), truth)


def add_outliers(rows: np.ndarray, rng: np.random.Generator, share: float = OUTLIER_SHARE) -> np.ndarray:
    """A copy of ``rows`` where ``share`` of them (at least one) have one feature multiplied by
    10^3 to 10^6: a data-entry or currency error, still a valid event.

    >>> out = add_outliers(np.ones((1000, 2)), np.random.default_rng(0))
    >>> int((out > 999).sum())
    3
    """
    out = rows.copy()
    chosen = rng.choice(out.shape[0], size=max(1, round(share * out.shape[0])), replace=False)
    columns = rng.integers(0, out.shape[1], size=chosen.shape[0])
    out[chosen, columns] *= 10.0 ** rng.uniform(3, 6, size=chosen.shape[0])
    return out


def with_refunds(k: int, rng: np.random.Generator) -> Dataset:
    """Lognormal money plus a net spend that is negative for the segment that returns more than
    it buys (refunds), and for 5% of everyone else."""
    rows, truth = money_rows(rng, k)
    magnitude = np.exp(rng.normal(np.log(300.0), 0.8, size=rows.shape[0]))
    refunds = (truth == k - 1) | (rng.random(rows.shape[0]) < 0.05)
    net = np.where(refunds, -magnitude, magnitude)
    return Dataset(f"lognormal + refunds (negatives) K={k}", "synthetic", REFUND_FEATURES,
                   np.column_stack([rows, net]), truth)


def axis_names(d: int) -> tuple[str, ...]:
    return tuple(f"x{i}" for i in range(d))


SYNTHETIC: tuple[Callable[[int, np.random.Generator], Dataset], ...] = (
    equal_blobs, unequal_blobs, anisotropic_blobs, lognormal_money, with_outliers, with_refunds,
)


def synthetic_sets(draws: int = 1) -> list[Dataset]:
    """Every synthetic kind at every K of ``SYNTHETIC_K``, ``draws`` independent times (draws
    after the first are named so)."""
    out = []
    for draw in range(draws):
        for i, make in enumerate(SYNTHETIC):
            for k in SYNTHETIC_K:
                dataset = make(k, np.random.default_rng([draw, i, k]))
                if draw > 0:
                    dataset = replace(dataset, name=f"{dataset.name}, draw {draw + 1}")
                out.append(dataset)
    return out


def bundled_sets() -> list[Dataset]:
    """iris, wine, breast cancer and digits, as scikit-learn ships them (no download)."""
    out = []
    for name, load in (("iris", bundled.load_iris), ("wine", bundled.load_wine),
                       ("breast cancer", bundled.load_breast_cancer), ("digits", bundled.load_digits)):
        data = load()
        out.append(Dataset(name, "bundled", axis_names(data.data.shape[1]),
                           data.data.astype(np.float64), data.target))
    return out
