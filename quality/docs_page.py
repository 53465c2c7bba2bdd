"""docs/model-quality.md: the environment, the K-selection table and the gate scenarios, all
from one run of ``python -m quality``."""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib.metadata import version as package_version
from pathlib import Path

from quality.cost import Cost
from quality.k_table import (
    K_RIGHT_TARGET,
    REALISTIC_ARI_TARGET,
    REALISTIC_OF_LOG_KMEANS,
    WITHIN_ONE_TARGET,
    KRow,
    RealisticRow,
    share_right,
)
from quality.realistic import HELD_OUT_SEEDS, TUNING_SEEDS
from quality.scenarios import ScenarioRow
from segmentation.settings import Settings
from trainer.fit import CH_TOLERANCE, K_SELECTION, MIN_STABILITY, SILHOUETTE_BAND

ROOT = Path(__file__).resolve().parent.parent


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The processor's name where Linux tells it, else the architecture."""
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def environment() -> list[tuple[str, str]]:
    """When, where and with what the figures were measured."""
    libraries = ", ".join(f"{p} {package_version(p)}" for p in ("scikit-learn", "numpy", "scipy"))
    return [
        ("date", datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")),
        ("machine", f"{platform.system()}, {cpu_model()}, {os.cpu_count()} cores (shared with other work)"),
        ("versions", f"Python {platform.python_version()}, {libraries}"),
    ]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table.

    >>> print(markdown_table(["a", "b"], [[1, "x"]]))
    | a | b |
    |---|---|
    | 1 | x |
    """
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def k_markdown(rows: list[KRow]) -> str:
    header = ["dataset", "rows", "true K", "K chosen", "K in the band", "silhouette alone",
              "CH alone", "DB alone", "ARI default pipeline", "ARI default pipeline at true K",
              "ARI plain KMeans at true K", "features logged", "fit s"]
    return markdown_table(header, [
        [r.name, r.rows, r.true_k, r.chosen_k if r.k_right else f"**{r.chosen_k}**",
         ",".join(map(str, r.plausible_ks)), r.silhouette_k, r.calinski_harabasz_k, r.davies_bouldin_k,
         f"{r.ari_default:.3f}", f"{r.ari_true_k:.3f}", f"{r.ari_plain:.3f}", len(r.logged),
         f"{r.seconds:.1f}"]
        for r in rows])


def heavy_tailed(rows: list[KRow]) -> list[KRow]:
    """The lognormal and outlier sets: the preprocessing's target."""
    return [r for r in rows if r.name.startswith("lognormal money") or "outliers" in r.name]


def k_summary(rows: list[KRow]) -> list[str]:
    synthetic = [r for r in rows if r.kind == "synthetic"]
    money = heavy_tailed(rows)
    not_plain = [f"{r.name} ({r.ari_default:.3f} < {r.ari_plain:.3f}; told the true K the pipeline "
                 f"reaches {r.ari_true_k:.3f})" for r in synthetic if not r.at_least_plain]
    return [
        f"* Automatic K is right on **{sum(r.k_right for r in synthetic)} of {len(synthetic)}** synthetic "
        f"sets ({share_right(synthetic):.0%}; target {K_RIGHT_TARGET:.0%}). On the same fits, the "
        f"silhouette's maximum alone would be right on {sum(r.silhouette_k == r.true_k for r in synthetic)}, "
        f"Calinski-Harabasz alone on {sum(r.calinski_harabasz_k == r.true_k for r in synthetic)}, "
        f"Davies-Bouldin alone on {sum(r.davies_bouldin_k == r.true_k for r in synthetic)}.",
        f"* On the lognormal and outlier sets the default pipeline's ARI is at least plain KMeans' at "
        f"the true K on **{sum(r.at_least_plain for r in money)} of {len(money)}** (mean "
        f"{sum(r.ari_default for r in money) / max(len(money), 1):.3f} against "
        f"{sum(r.ari_plain for r in money) / max(len(money), 1):.3f}).",
        "* Synthetic sets where plain KMeans at the true K does better: "
        + ("; ".join(not_plain) if not_plain else "none") + ".",
        "* Bundled datasets: " + "; ".join(f"{r.name} K={r.chosen_k} (true {r.true_k})"
                                           for r in rows if r.kind == "bundled") + ".",
    ]


def realistic_markdown(rows: list[RealisticRow]) -> str:
    header = ["dataset", "true K", "K chosen", "stable K", "rows outside the envelope",
              "ARI default pipeline", "ARI plain log-KMeans at true K", "ARI supervised (ceiling)", "fit s"]
    return markdown_table(header, [
        [r.name, r.true_k, r.chosen_k if r.within_one else f"**{r.chosen_k}**",
         ",".join(map(str, r.stable_ks)) or "-", r.outside,
         *(f"{a:.3f}" if r.true_k > 1 else "-" for a in (r.ari_default, r.ari_log_kmeans, r.ari_supervised)),
         f"{r.seconds:.1f}"]
        for r in rows])


def realistic_summary(rows: list[RealisticRow]) -> list[str]:
    structured = [r for r in rows if r.true_k > 1]
    blobs = [r for r in rows if r.true_k == 1]
    n = max(len(structured), 1)
    ours = sum(r.ari_default for r in structured) / n
    plain = sum(r.ari_log_kmeans for r in structured) / n
    ceiling = sum(r.ari_supervised for r in structured) / n
    return [
        f"* Realistic sets: automatic K's mean ARI **{ours:.3f}** (target {REALISTIC_ARI_TARGET}), "
        f"{ours / plain if plain else 0:.0%} of plain log-KMeans told the true K ({plain:.3f}; target "
        f"{REALISTIC_OF_LOG_KMEANS:.0%}); supervised ceiling {ceiling:.3f}.",
        f"* K within +-1 of the truth on **{sum(r.within_one for r in structured)} of {len(structured)}** "
        f"(target {WITHIN_ONE_TARGET:.0%}); exactly right on "
        f"{sum(r.chosen_k == r.true_k for r in structured)}.",
        f"* No-structure sets reported as one segment: **{sum(r.chosen_k == 1 for r in blobs)} of "
        f"{len(blobs)}**.",
    ]


REALISTIC_INTRO = f"""\
Generated by `quality/realistic.py` (its docstring lists every parameter): 6,000 customers in
eight features (recency, 90- and 365-day purchase counts as zero-inflated negative binomials,
90-day spend lognormal with refunds, basket, sessions, tenure, items per purchase), 3 to 8
overlapping segments of unequal size, one of them 2%, and 0.5% of the rows at absurd values;
and single populations (Gaussian, lognormal, Student-t) in the same features. Defaults were tuned
on seeds {TUNING_SEEDS.start}..{TUNING_SEEDS.stop - 1} only; every row below is a held-out seed
({HELD_OUT_SEEDS.start}..{HELD_OUT_SEEDS.stop - 1}). Each set goes through the trainer's path with
the default settings except the feature list and `k = null`; *plain log-KMeans* is signed log1p
on every feature, winsorized at the 0.5% quantiles, standardised, `KMeans(n_init=10)` told the
true K; the ceiling is a gradient-boosting classifier's 5-fold cross-validated predictions. A K
in bold is more than one from the truth."""


def scenario_markdown(rows: list[ScenarioRow]) -> str:
    header = ["window", "refused by the gate", "checks that refused (runs)", "refit silhouette",
              "drift, current model kept", "drift after --force", "events keeping their id after --force"]
    return markdown_table(header, [
        [r.name, f"{r.refused}/{len(r.outcomes)}",
         ", ".join(f"{c} {n}" for c, n in sorted(r.checks.items())) or "-",
         f"{r.mean(lambda o: o.run.fit.silhouette):.3f}", f"{r.mean(lambda o: o.drift_kept):+.3f}",
         f"{r.mean(lambda o: o.drift_forced):+.3f}", f"{r.mean(lambda o: o.ids_kept):.1%}"]
        for r in rows])


def cost_lines(cost: Cost, settings: Settings) -> list[str]:
    return [
        f"Per K on {cost.rows:,} rows x 6 features (five blobs): one `KMeans(n_init={settings.n_init})` "
        f"fit {cost.fit_s:.2f} s; sampled silhouette ({settings.silhouette_sample} rows) "
        f"{cost.silhouette_s:.3f} s; Davies-Bouldin {cost.davies_bouldin_s:.3f} s; Calinski-Harabasz "
        f"{cost.calinski_harabasz_s:.3f} s. Choosing K over {settings.k_min}..{settings.k_max} costs "
        f"{settings.k_max - settings.k_min + 1} fits and their scores; the silhouette and Davies-Bouldin "
        "were scored for every K before, Calinski-Harabasz adds one pass over the rows."
    ]


CRITERION = f"""\
`trainer/fit.py: choose_k`, used whenever `SEG_K=null` (K chosen over `SEG_K_MIN..SEG_K_MAX`,
or one segment):

1. **The silhouette says which K are plausible**: every K whose sampled silhouette (stratified
   by cluster) is at least {1 - SILHOUETTE_BAND:.0%} of the best K's. Cutting a real cluster in two
   costs a lot of silhouette, so over-split K drop out here.
2. **Stability says which are real**: two K-Means fits on independent subsamples of
   `SEG_STABILITY_SAMPLE` rows must agree (adjusted Rand index of their partitions of a common
   sample, mean of two pairs) at {MIN_STABILITY} or more.
3. **Calinski-Harabasz bounds, the largest K wins**: among those, the K whose ratio of between-
   to within-cluster dispersion is within {CH_TOLERANCE:.0%} of the best, and of them the largest;
   the current model's K is kept while it is one of them.
4. **One segment** when no K is stable: "no segment structure" is the outcome, with the reason.

Recorded in each bundle as `quality.k_selection` = "{K_SELECTION}", with every K's silhouette,
Davies-Bouldin, Calinski-Harabasz and inertia in `quality.k_scores`.

Why this combination. The silhouette's own maximum leans low: when two clusters sit nearer each
other than the rest (iris' versicolor and virginica, two close segments of five, blobs stretched
by a shared linear map), merging them barely changes everybody else's distance to the nearest
other cluster, so the coarser K often scores higher. Calinski-Harabasz (the best of the 30
stopping rules compared by Milligan and Cooper, 1985) does not lean low on well-separated nested
structure, but on overlapping customer segments it falls with K past the coarse "recent buyers
vs the rest" split, as the silhouette does; taking either maximum merges real segments. Hence the
largest K that every check accepts: the silhouette band rules out a real segment cut in two,
stability rules out a cut that depends on the sample (and detects a single population, which
K-Means cuts differently in every sample), and the Calinski-Harabasz tolerance stops a wide
segment that splits the same way every time (measured: 12% under the true K's on an unequal set).
Stability is the subsample ARI of Lange et al. (2004) rather than prediction strength
(Tibshirani and Walther 2005), whose minimum over segments swings with a 2% segment's few rows.
Not used: the gap statistic (Tibshirani, Walther and Hastie 2001), which needs B reference data
sets fitted at every K. Known limit: one strongly elongated population is split the same way by
every sample and is reported as two segments. The stability fits are on subsamples of
`SEG_STABILITY_SAMPLE` rows with `n_init=3`, so their cost does not grow with the window."""


def document(environment_rows: list[tuple[str, str]], k_rows: list[KRow], scenarios: list[ScenarioRow],
             first_silhouette: float, cost: Cost, settings: Settings,
             realistic_rows: Sequence[RealisticRow] = ()) -> str:
    layouts = len(scenarios[0].outcomes) if scenarios else 0
    parts = [
        "# Model quality: choosing K, and what the gate does when segments go",
        "",
        "Written by `make quality` (`python -m quality`); every figure below is from that run.",
        "The design behind it: [design.md](design.md#trainer).",
        "",
        markdown_table(["", ""], environment_rows),
        "",
        "## How K is chosen",
        "",
        CRITERION,
        "",
        "## K selection against the truth",
        "",
        "Each dataset goes through the trainer's own code path (`trainer.pipeline.fit_window` with the "
        "default settings and `k = null`: the automatic log by skewness, clipping at the widened "
        "training quantiles, the standard scaler, K-Means for every K, the criterion above), and is "
        "compared with plain `StandardScaler` + `KMeans(n_init=10)` told the true K. ARI is the "
        "adjusted Rand index against the true labels (1 = the same partition, 0 = chance). A chosen K "
        "in bold is wrong. Synthetic sets (`quality/datasets.py`): populations at least 3 x the sum of "
        "their standard deviations apart (money: in log space, lognormal sigma 0.35 per feature), 500 "
        "customers each; unequal: sizes 1x to 8x, spreads 0.5 to 2; anisotropic: one shared linear "
        "stretch (0.4 to 2.5); outliers: 0.3% of the customers with one value x10^3..10^6; refunds: "
        "a net spend that is negative for one segment and 5% of the others. Each kind at K = 4, 5, 6, "
        "in two independent draws.",
        "",
        k_markdown(k_rows),
        "",
        *k_summary(k_rows),
        "",
        *cost_lines(cost, settings),
        "",
        "## Realistic customer data and no-structure sets",
        "",
        REALISTIC_INTRO,
        "",
        realistic_markdown(list(realistic_rows)),
        "",
        *realistic_summary(list(realistic_rows)),
        "",
        "## Collapse, merge, tiny segment, outliers",
        "",
        f"{layouts} random layouts of five demo-like populations (`quality/layouts.py`; the first, "
        f"accepted models have a mean silhouette of {first_silhouette:.3f}), each retrained on one "
        "window per row with the trainer's own preprocessing, fit ("
        f"{'K fixed at ' + str(settings.k) if settings.k is not None else 'K chosen'}), gate and "
        "matching (`quality/offline.py`), forced so that the refit can be "
        "examined. *Drift* is the consumer's `segment_silhouette_drift` (its `DriftTracker` on "
        "fresh events of the window: sampled silhouette minus the accepted baseline; the "
        "`SegmentSilhouetteDrift` alert fires below -0.1): first with the current model kept (what "
        "happens after a refusal), then after a forced publish of the refit.",
        "",
        scenario_markdown(scenarios),
        "",
        "A refusal keeps the current model, so *drift, current model kept* is what the consumers "
        "report after it; `--force` publishes the refit anyway and keeps the accepted baseline, so "
        "the drift stays measured against the last model the gate accepted. *Events keeping their "
        "id* compares the segment ids of fresh events under the first model and under the forced "
        "refit.",
        "",
    ]
    return "\n".join(parts)
