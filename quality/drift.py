"""Retrains over time: what happens to segment ids and to the gate when the customers move.

Every scenario runs the trainer's own functions (``quality.offline.retrain``) with the default
settings, choosing K (``SEG_K`` unset), on windows drawn independently per seed:

* **ageing cohort** (``quality.realistic``): one customer base retrained every quarter; each
  quarter every tenure grows by 91 days, and the quiet segments' customers (lapsed, at risk) age
  too: recency grows by 91 days, and the purchases and spend that fall out of their windows go
  to 0. Measured: whether every quarter publishes, and of the customers whose segment an
  unchanged model keeps, the share that keep their id;
* **stationary** (``quality.realistic``): two windows of the same segments, different customers;
* **birth**, **split**, **merge**, **ratchet** (``quality.layouts``: five well separated
  populations): a new population of ``BIRTH_SHARE`` of the customers at least ``BIRTH_SPREADS``
  of every population's standard deviations from it; one population cut into two halves
  ``SPLIT_SPREADS`` standard deviations apart; the two closest populations meeting at their
  midpoint; and a collapse (centres pulled to ``RATCHET_END`` of their distance) cut into
  ``RATCHET_STEPS`` steps, each retrained on top of the last published model.

Seeds: the realistic family's held-out seeds, and the same numbers for the layouts' scenarios;
the thresholds of K selection and matching were tuned on other seeds (layouts 100 to 105,
realistic 0 to 19), except two set while diagnosing ageing-cohort refusals on held-out seeds
1003, 1006 and 1007 (``segmentation.matching.ENVELOPE_Z``, ``trainer.refit.EMPTIED_FRACTION``):
so ``python -m quality`` also runs the table on ``FRESH_SEEDS``, never looked at while tuning
(``python -m quality.drift --seeds 3000 10`` runs just that). Birth,
split and merge are retrained with ``--force`` so that how the diff names them is seen whatever
the gate says; the table also says how often the gate asked for an ``--accept``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from quality.layouts import PER_POPULATION, Layout, random_layout, random_means, rows_of
from quality.offline import IdSequences, Published, retrain, segment_ids
from quality.realistic import FEATURES, HELD_OUT_SEEDS, KINDS, realistic
from segmentation.bundle import ModelBundle, SegmentDiff
from segmentation.settings import Settings
from trainer.gate import silhouette_allowance

QUARTER_DAYS = 91.0
QUARTERS = 4
QUIET_SEGMENTS = (1, 3)  # lapsed and at risk in quality.realistic.K_ORDER
BIRTH_SHARE = 0.1
BIRTH_SPREADS = 5.0
SPLIT_SPREADS = 4.0
RATCHET_STEPS = 10
RATCHET_END = 0.3
FRESH_SEEDS = range(3000, 3010)  # never looked at while tuning anything


def realistic_settings(base: Settings | None = None) -> Settings:
    """The defaults, choosing K, on the realistic family's features and kinds."""
    base = base or Settings()
    return base.model_copy(update={"features": FEATURES, "feature_kinds": KINDS, "categorical": (),
                                   "k": None})


def layout_settings(base: Settings | None = None) -> Settings:
    return (base or Settings()).model_copy(update={"k": None})


def aged(rows: np.ndarray, truth: np.ndarray, days: float) -> np.ndarray:
    """The same customers ``days`` later: tenure grows for all; the quiet segments' recency
    grows too, and the purchases that leave the 90- and 365-day windows go.

    >>> rows = np.array([[80.0, 1, 3, 50.0, 50.0, 2, 400, 2.0], [5.0, 4, 9, 300.0, 70.0, 9, 400, 2.0]])
    >>> aged(rows, np.array([1, 0]), 91.0)[:, [0, 1, 2, 3, 6]].tolist()
    [[171.0, 0.0, 3.0, 0.0, 491.0], [5.0, 4.0, 9.0, 300.0, 491.0]]
    """
    out = rows.copy()
    column = {name: i for i, name in enumerate(FEATURES)}
    out[:, column["tenure_days"]] += days
    quiet = np.isin(truth, QUIET_SEGMENTS)
    recency = out[:, column["recency_days"]]
    recency[quiet] += days
    out[quiet & (recency > 90), column["frequency_90d"]] = 0.0
    out[quiet & (recency > 90), column["monetary_90d"]] = 0.0
    out[quiet & (recency > 365), column["frequency_365d"]] = 0.0
    return out


@dataclass(frozen=True)
class AgeingRun:
    published: int  # quarters (after the first) that published a model
    quarters: int
    kept: float  # of the customers an unchanged model keeps in their segment, share keeping the id


def ageing_cohort(seed: int, settings: Settings) -> AgeingRun:
    """Quarterly retrains of one ageing customer base; ids are followed from each published model
    to the next."""
    data = realistic(seed)
    registry = IdSequences()
    first = retrain(data.rows, None, registry, settings)
    if first.bundle is None:
        return AgeingRun(0, QUARTERS - 1, 0.0)
    current, rows = first.bundle, data.rows
    published, kept, eligible = 0, 0, 0
    for quarter in range(1, QUARTERS):
        later = aged(data.rows, data.truth, QUARTER_DAYS * quarter)
        run = retrain(later, current, registry, settings)
        before = segment_ids(current, rows)
        unchanged = segment_ids(current, later) == before
        if run.bundle is not None:
            published += 1
            kept += int((segment_ids(run.bundle, later)[unchanged] == before[unchanged]).sum())
            current = run.bundle
        else:
            kept += int(unchanged.sum())  # the model stays: so do the ids
        eligible += int(unchanged.sum())
        rows = later
    return AgeingRun(published, QUARTERS - 1, kept / max(eligible, 1))


def bundle_of(run: Published) -> ModelBundle:
    """The bundle of a run that must have made one (a first model, a forced retrain)."""
    if run.bundle is None:
        raise RuntimeError("no model: " + "; ".join(f.detail for f in run.failures))
    return run.bundle


@dataclass(frozen=True)
class StationaryRun:
    published: bool
    kept: float  # share of customers with the same id under both models
    k_before: int
    k_after: int
    first_model: bool = True  # False: the first window published no model (nothing to compare)


def stationary(seed: int, settings: Settings) -> StationaryRun:
    """Two windows of the same segments (different customers): the retrain must change nothing."""
    data = realistic(seed, n=12_000)
    half = data.rows.shape[0] // 2
    registry = IdSequences()
    first = retrain(data.rows[:half], None, registry, settings)
    if first.bundle is None:
        return StationaryRun(False, 0.0, 0, 0, first_model=False)
    v1 = first.bundle
    run = retrain(data.rows[half:], v1, registry, settings)
    later = data.rows[half:]
    kept = 1.0 if run.bundle is None else float(
        (segment_ids(v1, later) == segment_ids(run.bundle, later)).mean())
    return StationaryRun(run.bundle is not None and not run.failures, kept, v1.k,
                         run.bundle.k if run.bundle is not None else v1.k)


def first_layout_model(
    rng: np.random.Generator, settings: Settings,
) -> tuple[Layout, IdSequences, ModelBundle]:
    while True:
        layout = random_layout(rng)
        registry = IdSequences()
        first = retrain(layout.window(rng), None, registry, settings)
        if first.bundle is not None and first.bundle.k == layout.means.shape[0]:
            return layout, registry, first.bundle


def majority_id(bundle: ModelBundle, rows: np.ndarray) -> int:
    values, counts = np.unique(segment_ids(bundle, rows), return_counts=True)
    return int(values[np.argmax(counts)])


def diff_of(bundle: ModelBundle, segment_id: int) -> SegmentDiff | None:
    return next((d for d in bundle.label_mapping.diff if d.segment_id == segment_id), None)


@dataclass(frozen=True)
class StructuralRun:
    named: bool  # the diff named the change as the scenario made it
    needed_accept: bool  # the gate refused it without --accept
    detail: str


def far_population(layout: Layout, rng: np.random.Generator) -> np.ndarray:
    """A mean at least ``BIRTH_SPREADS`` standard deviations (its own and each population's)
    from every population."""
    while True:
        mean = random_means(rng, 1)[0]
        spread = mean * layout.spreads[0] / layout.means[0]
        if all(np.linalg.norm((mean - m) / np.maximum(s, spread)) >= BIRTH_SPREADS
               for m, s in zip(layout.means, layout.spreads, strict=True)):
            return mean


def birth(seed: int, settings: Settings) -> StructuralRun:
    rng = np.random.default_rng([23, seed])
    layout, registry, v1 = first_layout_model(rng, settings)
    mean = far_population(layout, rng)
    grown = Layout(np.vstack([layout.means, mean]),
                   np.vstack([layout.spreads, mean * layout.spreads[0] / layout.means[0]]))
    newborns = round(BIRTH_SHARE * PER_POPULATION * 5 / (1 - BIRTH_SHARE))
    sizes = [PER_POPULATION] * 5 + [newborns]
    run = retrain(grown.window(rng, sizes=sizes), v1, registry, settings, force=True)
    v2 = bundle_of(run)
    test = grown.window(rng, sizes=sizes)[PER_POPULATION * 5:]
    sid = majority_id(v2, test)
    entry = diff_of(v2, sid)
    named = sid not in v1.segment_ids and entry is not None and entry.status == "born"
    return StructuralRun(named, run.refused, f"{entry.status if entry else None}")


def split(seed: int, settings: Settings) -> StructuralRun:
    rng = np.random.default_rng([29, seed])
    layout, registry, v1 = first_layout_model(rng, settings)
    p = 2
    direction = rng.normal(size=layout.means.shape[1])
    offset = SPLIT_SPREADS / 2 * layout.spreads[p] * direction / np.linalg.norm(direction)
    others = [i for i in range(5) if i != p]
    means = np.vstack([layout.means[others], layout.means[p] - offset, layout.means[p] + offset])
    spreads = np.vstack([layout.spreads[others], layout.spreads[p], layout.spreads[p]])
    halves = Layout(means, spreads)
    sizes = [PER_POPULATION] * 4 + [PER_POPULATION // 2] * 2
    run = retrain(halves.window(rng, sizes=sizes), v1, registry, settings, force=True)
    v2 = bundle_of(run)
    parent = majority_id(v1, layout.window(rng)[rows_of(p)])
    test = halves.window(rng, sizes=sizes)
    a = majority_id(v2, test[PER_POPULATION * 4: PER_POPULATION * 4 + PER_POPULATION // 2])
    b = majority_id(v2, test[PER_POPULATION * 4 + PER_POPULATION // 2:])
    entries = [diff_of(v2, a), diff_of(v2, b)]
    named = a != b and all(e is not None and e.status == "split" and e.parents == [parent]
                           for e in entries)
    return StructuralRun(named, run.refused, ",".join(f"{e.status}{e.parents}" for e in entries if e))


def merge(seed: int, settings: Settings) -> StructuralRun:
    rng = np.random.default_rng([31, seed])
    layout, registry, v1 = first_layout_model(rng, settings)
    a, b = layout.closest_pair()
    parents = {majority_id(v1, layout.window(rng)[rows_of(i)]) for i in (a, b)}
    run = retrain(layout.window(rng, layout.merged()), v1, registry, settings, force=True)
    v2 = bundle_of(run)
    sid = majority_id(v2, layout.window(rng, layout.merged())[rows_of(a)])
    entry = diff_of(v2, sid)
    named = entry is not None and entry.status == "merged" and parents <= set(entry.parents)
    return StructuralRun(named, run.refused, f"{entry.status}{entry.parents}" if entry else "none")


@dataclass(frozen=True)
class RatchetRun:
    refused_at: int | None  # the first step refused (1-based), None if all published
    published_drop: float  # the largest silhouette drop below the anchor among published models
    allowed: float  # the anchor's allowed drop


def ratchet(seed: int, settings: Settings) -> RatchetRun:
    """The collapse in small steps, each retrained on top of the last published model."""
    rng = np.random.default_rng([37, seed])
    layout, registry, v1 = first_layout_model(rng, settings)
    current, worst, refused_at = v1, 0.0, None
    for step in range(1, RATCHET_STEPS + 1):
        pull = 1.0 - (1.0 - RATCHET_END) * step / RATCHET_STEPS
        run = retrain(layout.window(rng, layout.collapsed(pull)), current, registry, settings)
        if run.bundle is None:
            refused_at = refused_at or step
            continue
        current = run.bundle
        worst = max(worst, v1.quality.silhouette - run.bundle.quality.silhouette)
    allowed = silhouette_allowance(v1.quality.silhouette, settings.gate_max_silhouette_drop,
                                   settings.gate_silhouette_budget, 0.0) or 0.0
    return RatchetRun(refused_at, worst, allowed)


@dataclass(frozen=True)
class DriftTable:
    ageing: list[AgeingRun]
    stationary: list[StationaryRun]
    birth: list[StructuralRun]
    split: list[StructuralRun]
    merge: list[StructuralRun]
    ratchet: list[RatchetRun]


def drift_table(seeds: range = HELD_OUT_SEEDS, base: Settings | None = None,
                progress: Callable[[str], None] = lambda _: None) -> DriftTable:
    real, layouts = realistic_settings(base), layout_settings(base)
    table = DriftTable(
        ageing=[ageing_cohort(s, real) for s in seeds],
        stationary=[stationary(s, real) for s in seeds],
        birth=[birth(s, layouts) for s in seeds],
        split=[split(s, layouts) for s in seeds],
        merge=[merge(s, layouts) for s in seeds],
        ratchet=[ratchet(s, layouts) for s in seeds],
    )
    progress("drift scenarios done")
    return table


def drift_markdown(t: DriftTable) -> str:
    n = len(t.birth)
    ageing_published = sum(r.published for r in t.ageing)
    quarters = sum(r.quarters for r in t.ageing)
    compared = [r.kept for r in t.stationary if r.first_model] or [float("nan")]
    no_first = sum(not r.first_model for r in t.stationary)
    rows = [
        ("ageing cohort, quarterly retrains", f"{ageing_published}/{quarters} quarters published",
         f"ids kept: min {min(r.kept for r in t.ageing):.1%}, mean {np.mean([r.kept for r in t.ageing]):.1%} "
         "of the customers an unchanged model keeps"),
        ("stationary retrain", f"{sum(r.published for r in t.stationary)}/{len(t.stationary)} published"
         + (f" (no first model on {no_first})" if no_first else ""),
         f"ids kept: min {min(compared):.1%}, mean {np.mean(compared):.1%}; K changed in "
         f"{sum(r.k_before != r.k_after for r in t.stationary if r.first_model)}"),
        (f"birth ({BIRTH_SHARE:.0%} of customers, >= {BIRTH_SPREADS:g} spreads away)",
         f"named born with a new id {sum(r.named for r in t.birth)}/{n}",
         f"needed --accept {sum(r.needed_accept for r in t.birth)}/{n}"),
        (f"split (halves {SPLIT_SPREADS:g} spreads apart)",
         f"named split, parent named {sum(r.named for r in t.split)}/{n}",
         f"needed --accept {sum(r.needed_accept for r in t.split)}/{n}"),
        ("merge (two closest populations)", f"named merged, both parents {sum(r.named for r in t.merge)}/{n}",
         f"needed --accept {sum(r.needed_accept for r in t.merge)}/{n}"),
        (f"ratchet (collapse to {RATCHET_END:g} in {RATCHET_STEPS} steps)",
         f"refused {sum(r.refused_at is not None for r in t.ratchet)}/{n}, at steps "
         f"{[r.refused_at for r in t.ratchet]}",
         f"largest published drop below the anchor {max(r.published_drop for r in t.ratchet):.3f} "
         f"(allowed {min(r.allowed for r in t.ratchet):.3f}..{max(r.allowed for r in t.ratchet):.3f})"),
    ]
    lines = ["| scenario | outcome | detail |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def drift_section(held_out: DriftTable, fresh: DriftTable | None = None) -> str:
    """The drift scenarios' part of docs/model-quality.md: the held-out seeds' table, then the
    fresh seeds' one when it was run."""
    text = ("\n## Retrains over time: ids, structural changes and the ratchet\n\n"
            + (__doc__ or "").split("\n\n", 1)[1].strip() + "\n\n" + drift_markdown(held_out) + "\n")
    if fresh is not None:
        text += ("\nThe same scenarios on the fresh seeds (never looked at while tuning):\n\n"
                 + drift_markdown(fresh) + "\n")
    return text


if __name__ == "__main__":
    import sys
    first = HELD_OUT_SEEDS.start
    if sys.argv[1:2] == ["--seeds"]:  # --seeds FIRST [COUNT]
        first, argv = int(sys.argv[2]), sys.argv[3:]
    else:
        argv = sys.argv[1:]
    count = int(argv[0]) if argv else len(HELD_OUT_SEEDS)
    seeds = range(first, first + count)
    print(drift_markdown(drift_table(seeds)))
