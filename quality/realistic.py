"""Realistic customer data: the family the defaults are tuned and measured on.

Each set is one row per customer in eight features, computed as a marketing team would:

* ``recency_days``: days since the last purchase, ``offset + Exponential(scale)`` per segment
  (capped at the tenure);
* ``frequency_365d``: purchases in the last year, ``1 + NegativeBinomial`` around the segment's
  yearly rate (gamma-distributed per customer, shape ``RATE_SHAPE``) when the last purchase is
  within the year, else 0;
* ``frequency_90d``: the part of those purchases made in the last 90 days (binomial thinning,
  so it is never above the 365-day count), at least 1 when the last purchase is within 90 days,
  else 0. Both counts are zero-inflated negative binomials: most lapsed customers have none;
* ``monetary_90d``: spend in the last 90 days, ``frequency_90d x basket x LogNormal(0, 0.3)``; 0
  without a purchase; for a share of buyers (``refunds`` per segment) net negative: refunds
  bigger than the purchases, ``-LogNormal(basket)``;
* ``avg_basket_value``: ``LogNormal(log basket, BASKET_SIGMA)`` per customer;
* ``sessions_30d``: ``Poisson`` around the segment's rate (gamma-mixed per customer);
* ``tenure_days``: uniform in the segment's range, at least the recency (a feature that ages
  with the calendar, near-uniform within a segment);
* ``items_per_purchase``: ``1 + LogNormal`` around the segment's median minus one (a ratio).

Segments (``ARCHETYPES``; a set with true K uses the first K of ``K_ORDER``): loyal regulars,
lapsed, a 2% wholesale segment (huge baskets and items), at risk (between loyal and lapsed in
recency: it overlaps both), new customers (short tenure), champions, bargain hunters (many
sessions, small baskets) and browsers (sessions but rare purchases). Per set, every archetype's
parameters are jittered (``LogNormal(0, JITTER)``), the shares of the segments other than the 2%
one are unequal (``Dirichlet(2)`` with at least ``MIN_SHARE``), and ``OUTLIER_SHARE`` of the
rows have one feature at an absurd value (``(|v| + 1) x 10^3..10^6``; they keep their true
segment). True K is ``3 + seed % 6``: 3 to 8.

No-structure sets (truth: one segment) have the same eight features drawn as one population
around ``TYPICAL``: independent Gaussians (``BLOB_CV`` x the typical value), a lognormal blob
(sigma ``BLOB_SIGMA``) and a Student-t blob (``T_DF`` degrees of freedom, scale ``BLOB_SIGMA``,
on the log scale so that every value stays positive).

Seeds: ``TUNING_SEEDS`` are the only ones any default was chosen on; every reported figure is
from ``HELD_OUT_SEEDS``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from quality.datasets import Dataset

FEATURES = ("recency_days", "frequency_90d", "frequency_365d", "monetary_90d", "avg_basket_value",
            "sessions_30d", "tenure_days", "items_per_purchase")
KINDS = {"recency_days": "recency", "frequency_90d": "count", "frequency_365d": "count",
         "monetary_90d": "money", "avg_basket_value": "money", "sessions_30d": "count",
         "tenure_days": "tenure", "items_per_purchase": "ratio"}
CUSTOMERS = 6000
TUNING_SEEDS = range(0, 20)
HELD_OUT_SEEDS = range(1000, 1010)
SMALL_SHARE = 0.02
MIN_SHARE = 0.06
OUTLIER_SHARE = 0.005
JITTER = 0.12
RATE_SHAPE = 2.0  # gamma shape of each customer's purchase rate: NB dispersion
BASKET_SIGMA = 0.4
TYPICAL = np.array([40.0, 2.0, 8.0, 150.0, 50.0, 8.0, 700.0, 3.0])
BLOB_CV = 0.3
BLOB_SIGMA = 0.5
T_DF = 3.0


@dataclass(frozen=True)
class Archetype:
    name: str
    recency_offset: float  # days
    recency_scale: float  # mean of the exponential part, days
    purchases_365d: float  # mean yearly purchases of an active customer
    basket: float  # median basket value
    sessions_30d: float
    tenure: tuple[float, float]  # days, uniform
    items: float  # median items per purchase
    refunds: float  # share of buyers whose 90-day net spend is negative


ARCHETYPES = {
    "loyal regulars": Archetype("loyal regulars", 0, 14, 12, 50, 8, (500, 2000), 3, 0.04),
    "lapsed": Archetype("lapsed", 120, 150, 2, 55, 0.4, (400, 2000), 3, 0.05),
    "wholesale": Archetype("wholesale", 0, 20, 8, 600, 4, (300, 1500), 25, 0.03),
    "at risk": Archetype("at risk", 45, 45, 5, 60, 2, (300, 1500), 3, 0.08),
    "new customers": Archetype("new customers", 0, 12, 3, 40, 6, (5, 90), 2, 0.03),
    "champions": Archetype("champions", 0, 5, 30, 90, 20, (400, 1500), 4, 0.02),
    "bargain hunters": Archetype("bargain hunters", 0, 12, 15, 15, 25, (200, 1000), 7, 0.05),
    "browsers": Archetype("browsers", 150, 200, 1, 30, 12, (50, 800), 1.5, 0.02),
}
K_ORDER = ("loyal regulars", "lapsed", "wholesale", "at risk", "new customers", "champions",
           "bargain hunters", "browsers")


def true_k(seed: int) -> int:
    """The number of segments of realistic set ``seed``: 3 to 8.

    >>> [true_k(s) for s in range(7)]
    [3, 4, 5, 6, 7, 8, 3]
    """
    return 3 + seed % 6


def jittered(a: Archetype, rng: np.random.Generator) -> Archetype:
    f = rng.lognormal(0.0, JITTER, size=7)
    return Archetype(a.name, a.recency_offset * f[0], a.recency_scale * f[1], a.purchases_365d * f[2],
                     a.basket * f[3], a.sessions_30d * f[4], a.tenure, a.items * f[5],
                     min(0.5, a.refunds * f[6]))


def segment_sizes(k: int, rng: np.random.Generator, n: int = CUSTOMERS) -> np.ndarray:
    """Customers per segment: the wholesale one (third) at ``SMALL_SHARE``, the others unequal.

    >>> sizes = segment_sizes(5, np.random.default_rng(0))
    >>> int(sizes.sum()), int(sizes[2]), bool(sizes.min() == sizes[2])
    (6000, 120, True)
    """
    shares = rng.dirichlet(np.full(k - 1, 2.0))
    shares = MIN_SHARE + shares * (1 - SMALL_SHARE - MIN_SHARE * (k - 1))
    shares = np.insert(shares, 2, SMALL_SHARE)
    sizes = np.floor(shares * n).astype(int)
    sizes[0] += n - sizes.sum()
    return sizes


def customers(a: Archetype, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` customers of one segment, in ``FEATURES`` order."""
    tenure = rng.uniform(*a.tenure, size=n)
    recency = np.minimum(a.recency_offset + rng.exponential(a.recency_scale, size=n), tenure)
    rate = a.purchases_365d * rng.gamma(RATE_SHAPE, 1 / RATE_SHAPE, size=n)
    f365 = np.where(recency <= 365, 1 + rng.poisson(np.maximum(rate - 1, 0)), 0)
    f90 = np.where(recency <= 90, 1 + rng.binomial(np.maximum(f365 - 1, 0), 0.25), 0)
    basket = rng.lognormal(np.log(a.basket), BASKET_SIGMA, size=n)
    spend = f90 * basket * rng.lognormal(0.0, 0.3, size=n)
    refund = (f90 > 0) & (rng.random(n) < a.refunds)
    spend = np.where(refund, -rng.lognormal(np.log(a.basket), BASKET_SIGMA, size=n), spend)
    sessions = rng.poisson(a.sessions_30d * rng.gamma(4.0, 0.25, size=n))
    items = 1 + rng.lognormal(np.log(max(a.items - 1, 0.1)), 0.35, size=n)
    tenure = np.maximum(tenure, recency)
    return np.column_stack([np.round(recency), f90, f365, np.round(spend, 2), np.round(basket, 2),
                            sessions, np.round(tenure), np.round(items, 2)]).astype(np.float64)


def absurd(rows: np.ndarray, rng: np.random.Generator, share: float = OUTLIER_SHARE) -> np.ndarray:
    """A copy where ``share`` of the rows have one feature at ``(|v| + 1) x 10^3..10^6``.

    >>> out = absurd(np.zeros((1000, 3)), np.random.default_rng(0))
    >>> int((out >= 1000).sum())
    5
    """
    out = rows.copy()
    chosen = rng.choice(out.shape[0], size=max(1, round(share * out.shape[0])), replace=False)
    columns = rng.integers(0, out.shape[1], size=chosen.shape[0])
    out[chosen, columns] = (np.abs(out[chosen, columns]) + 1) * 10.0 ** rng.uniform(3, 6, chosen.shape[0])
    return out


def realistic(seed: int, n: int = CUSTOMERS) -> Dataset:
    """Realistic set ``seed`` (see the module docstring); rows shuffled.

    >>> d = realistic(2, n=600)
    >>> d.true_k, d.rows.shape, bool((d.rows[:, 1] <= d.rows[:, 2]).mean() > 0.99)
    (5, (600, 8), True)
    """
    rng = np.random.default_rng([19, seed])
    k = true_k(seed)
    sizes = segment_sizes(k, rng, n)
    segments = [jittered(ARCHETYPES[name], rng) for name in K_ORDER[:k]]
    rows = np.vstack([customers(a, size, rng) for a, size in zip(segments, sizes, strict=True)])
    truth = np.repeat(np.arange(k), sizes)
    order = rng.permutation(n)
    return Dataset(f"realistic seed {seed} K={k}", "realistic", FEATURES,
                   absurd(rows, rng)[order], truth[order])


def blob(shape: str, seed: int, n: int = CUSTOMERS) -> Dataset:
    """One population (no segments) in the realistic features: ``gaussian``, ``lognormal`` or
    ``student-t``; counts are rounded to whole numbers.

    >>> d = blob("student-t", 0, n=100)
    >>> d.true_k, bool((d.rows >= 0).all())
    (1, True)
    """
    rng = np.random.default_rng([19, 1, seed])
    if shape == "gaussian":
        rows = TYPICAL + BLOB_CV * TYPICAL * rng.normal(size=(n, TYPICAL.shape[0]))
    elif shape == "lognormal":
        rows = TYPICAL * rng.lognormal(0.0, BLOB_SIGMA, size=(n, TYPICAL.shape[0]))
    elif shape == "student-t":
        # heavy tails on the multiplicative scale, as spend has: a Student-t in raw units would
        # push a few percent of the rows below zero, a real (sign) structure, not none
        rows = TYPICAL * np.exp(BLOB_SIGMA * rng.standard_t(T_DF, size=(n, TYPICAL.shape[0])))
    else:
        raise ValueError(f"unknown blob shape {shape}")
    counts = [i for i, f in enumerate(FEATURES) if KINDS[f] == "count"]
    rows[:, counts] = np.round(rows[:, counts])
    return Dataset(f"no structure: {shape} blob, seed {seed}", "no structure", FEATURES, rows,
                   np.zeros(n, dtype=int))


BLOB_SHAPES = ("gaussian", "lognormal", "student-t")


def realistic_sets(seeds: range = HELD_OUT_SEEDS) -> list[Dataset]:
    return [realistic(s) for s in seeds]


def no_structure_sets(seeds: range = HELD_OUT_SEEDS) -> list[Dataset]:
    """One blob per seed, the shapes in turn (10 seeds: 4 Gaussian, 3 lognormal, 3 Student-t)."""
    return [blob(BLOB_SHAPES[i % len(BLOB_SHAPES)], s) for i, s in enumerate(seeds)]
