"""``python -m trainer report --out DIR``: one self-contained HTML page that answers "does this
segmentation make business sense?" for the current model, with its figures as PNG files.

The page embeds every figure (base64), so ``index.html`` alone can be mailed or archived; the
same PNGs are written next to it for slides. Figures that need customers (the PCA scatter, the
per-sample silhouette, the profile table) read a sample of the current model's own training
window again, through the offsets recorded in its lineage; while those offsets are retained.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import silhouette_samples

from segmentation.bundle import BundleError, ModelBundle
from segmentation.cluster_metrics import davies_bouldin, nearest_two, stratified_sample
from segmentation.events import Event, raw_numeric
from segmentation.store import ModelStore, TrainerState
from trainer.window import WindowConfig, read_window

log = logging.getLogger(__name__)

# Customers re-read for the figures: enough for stable means, few enough for a quick report.
REPORT_ROWS = 3000
SILHOUETTE_ROWS = 1500
PALETTE = (
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f", "#bab0ac", "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#17becf",
)


def segment_colour(segment_id: int) -> str:
    """One colour per segment id, the same in every figure and every version.

    >>> segment_colour(0), segment_colour(16)
    ('#4e79a7', '#4e79a7')
    """
    return PALETTE[segment_id % len(PALETTE)]


@dataclass(frozen=True)
class ReportConfig:
    """What the report reads the training window with, and the K range a sweep covers when the
    bundle has no K curves of its own."""

    window: WindowConfig
    k_min: int
    k_max: int


@dataclass
class Sample:
    """Customers of the current model's training window, assigned by the current model."""

    events: list[Event]
    encoded: np.ndarray
    raw: np.ndarray  # numeric features in the events' own units
    index: np.ndarray  # centroid index per customer
    segment_ids: np.ndarray


def read_sample(config: WindowConfig, bundle: ModelBundle) -> tuple[Sample | None, str]:
    """Up to ``REPORT_ROWS`` customers of ``bundle``'s training window, or None and why not."""
    lineage = bundle.lineage
    if not lineage.partitions:
        return None, "the bundle records no offsets"
    sample_config = config.for_run(lineage.topic, bundle.features.numeric, REPORT_ROWS)
    try:
        window = read_window(sample_config, ranges=lineage.partitions)
    except Exception as exc:  # noqa: BLE001 - the report still shows everything that needs no data
        log.warning("training window unreadable", extra={"error": str(exc)})
        return None, f"the training window could not be read ({type(exc).__name__}: {exc})"
    if len(window.events) < 2:
        return None, "the recorded offsets are no longer retained by the topic"
    encoded, _ = bundle.features.encode(window.events)
    index, _, _ = nearest_two(encoded, bundle.centroid_array())
    note = ""
    if window.rows_read != lineage.rows_read:
        note = (f"only {window.rows_read} of the {lineage.rows_read} recorded messages are still "
                "retained; figures use what is left")
    return Sample(
        events=window.events, encoded=encoded,
        raw=raw_numeric(window.events, bundle.features.numeric), index=index,
        segment_ids=np.asarray(bundle.segment_ids)[index],
    ), note


# --- figures ----------------------------------------------------------------------------------
def png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", facecolor="white")
    return buf.getvalue()


def style(ax: Axes) -> None:
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.grid(alpha=0.25, linewidth=0.6)


def legend_name(segment_id: int, name: str) -> str:
    """``3: Champions``; default names already start with ``segment 3:``.

    >>> legend_name(3, "Champions"), legend_name(3, "segment 3: average")
    ('3: Champions', 'segment 3: average')
    """
    return name if name.startswith(f"segment {segment_id}") else f"{segment_id}: {name}"


def pca_scatter(bundle: ModelBundle, sample: Sample) -> bytes:
    """Customers on the first two principal components of the scaled space, by segment."""
    pca = PCA(n_components=2, random_state=0).fit(sample.encoded)
    points = pca.transform(sample.encoded)
    centres = pca.transform(bundle.centroid_array())
    fig = Figure(figsize=(8.5, 6.0))
    ax = fig.subplots()
    for i, (sid, name) in enumerate(zip(bundle.segment_ids, bundle.segment_names, strict=True)):
        mine = sample.index == i
        ax.scatter(points[mine, 0], points[mine, 1], s=9, alpha=0.45, color=segment_colour(sid),
                   linewidths=0, label=f"{legend_name(sid, name)} ({int(mine.sum())})")
    for (cx, cy), sid in zip(centres, bundle.segment_ids, strict=True):
        ax.scatter([cx], [cy], s=260, marker="o", color="white", edgecolors=segment_colour(sid),
                   linewidths=2.5, zorder=3)
        ax.annotate(str(sid), (cx, cy), ha="center", va="center", fontsize=9, fontweight="bold",
                    zorder=4)
    var = pca.explained_variance_ratio_
    ax.set_xlabel(f"principal component 1 ({var[0]:.0%} of variance)")
    ax.set_ylabel(f"principal component 2 ({var[1]:.0%} of variance)")
    ax.set_title(f"Customers of v{bundle.version}'s training window by segment "
                 f"(circles: centroids)", loc="left", fontsize=11)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False, fontsize=8.5,
              markerscale=2.0)
    style(ax)
    return png(fig)


def silhouette_plot(bundle: ModelBundle, sample: Sample, random_state: int) -> bytes:
    """Per-customer silhouette, sorted within each segment: thin or negative blades are
    customers that sit between segments."""
    idx = stratified_sample(sample.index, SILHOUETTE_ROWS, random_state)
    labels = sample.index[idx]
    fig = Figure(figsize=(8.5, 5.5))
    ax = fig.subplots()
    if np.unique(labels).shape[0] < 2:
        ax.text(0.5, 0.5, "one segment only: silhouette undefined", ha="center", transform=ax.transAxes)
        return png(fig)
    values = silhouette_samples(sample.encoded[idx], labels)
    y = 0
    for i, sid in enumerate(bundle.segment_ids):
        mine = np.sort(values[labels == i])
        if mine.size == 0:
            continue
        ax.fill_betweenx(np.arange(y, y + mine.size), 0, mine, color=segment_colour(sid), alpha=0.85,
                         linewidth=0)
        ax.text(-0.01, y + mine.size / 2, f"segment {sid}", ha="right", va="center", fontsize=8.5,
                transform=ax.get_yaxis_transform())
        y += mine.size + 12
    mean = float(values.mean())
    ax.axvline(mean, color="#c0392b", linestyle="--", linewidth=1.2)
    ax.text(mean, y, f" mean {mean:.3f}", color="#c0392b", va="bottom", fontsize=9)
    ax.axvline(0, color="#555", linewidth=0.8)
    ax.set_yticks([])
    ax.set_xlabel("silhouette of each sampled customer (-1 wrong segment, 0 in between, 1 clear)")
    ax.set_title("Per-customer silhouette by segment id", loc="left", fontsize=11)
    style(ax)
    return png(fig)


def k_sweep(x: np.ndarray, k_range: range, random_state: int) -> list[dict[str, float]]:
    """Inertia, silhouette and Davies-Bouldin over K on the sample, for a fixed-K model."""
    scores = []
    for k in k_range:
        if k >= x.shape[0]:
            break
        model = KMeans(n_clusters=k, init="k-means++", n_init=3, random_state=random_state)
        labels = model.fit_predict(x)
        idx = stratified_sample(labels, SILHOUETTE_ROWS, random_state)
        sil = float(silhouette_samples(x[idx], labels[idx]).mean()) if len(set(labels[idx])) > 1 else 0.0
        scores.append({"k": k, "inertia": float(model.inertia_), "silhouette": sil,
                       "davies_bouldin": davies_bouldin(x, labels)})
    return scores


def k_curves(scores: list[dict[str, float]], chosen: int, computed_here: bool) -> bytes:
    """The elbow (inertia) beside silhouette and Davies-Bouldin, over K."""
    ks = [int(s["k"]) for s in scores]
    fig = Figure(figsize=(11, 4.2))
    left, right = fig.subplots(1, 2)
    left.plot(ks, [s["inertia"] for s in scores], marker="o", color="#4e79a7")
    left.set_title("Elbow: inertia (always falls with K; never used alone)", loc="left", fontsize=10.5)
    left.set_ylabel("inertia (within-segment sum of squares)")
    right.plot(ks, [s["silhouette"] for s in scores], marker="o", color="#59a14f",
               label="silhouette (higher is better)")
    db = right.twinx()
    db.plot(ks, [s["davies_bouldin"] for s in scores], marker="s", color="#e15759", alpha=0.8,
            label="Davies-Bouldin (lower is better)")
    db.set_ylabel("Davies-Bouldin", color="#e15759")
    right.set_ylabel("silhouette", color="#59a14f")
    right.set_title("Silhouette and Davies-Bouldin", loc="left", fontsize=10.5)
    for ax in (left, right):
        ax.axvline(chosen, color="#333", linestyle=":", linewidth=1.2)
        ax.set_xlabel("K (dotted: the model's K)")
        ax.set_xticks(ks)
        style(ax)
    db.spines["top"].set_visible(False)
    lines = right.get_lines()[:1] + db.get_lines()[:1]
    right.legend(lines, [str(line.get_label()) for line in lines], loc="lower left", frameon=False,
                 fontsize=8.5)
    if computed_here:
        fig.suptitle("K is fixed in production: this sweep was computed on the report's sample",
                     fontsize=9.5, color="#666", x=0.01, ha="left")
    return png(fig)


def versions_plot(bundles: list[ModelBundle]) -> bytes:
    """Segment shares (stacked, by segment id) and silhouette, version by version."""
    fig = Figure(figsize=(11, 4.6))
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    labels = [f"v{b.version}" for b in bundles]
    seen: set[int] = set()
    for pos, b in enumerate(bundles):
        bottom = 0.0
        for sid, share in sorted(zip(b.segment_ids, b.quality.shares, strict=True)):
            left.bar(pos, share, bottom=bottom, color=segment_colour(sid), edgecolor="white",
                     linewidth=0.6, label=None if sid in seen else f"segment {sid}")
            if share >= 0.06:
                left.text(pos, bottom + share / 2, str(sid), ha="center", va="center", fontsize=7.5,
                          color="white")
            seen.add(sid)
            bottom += share
    left.set_xticks(range(len(bundles)), labels)
    left.set_ylabel("share of the training window")
    left.set_ylim(0, 1)
    left.set_title("Segment shares by version (colour = stable segment id)", loc="left", fontsize=10.5)
    handles, names = left.get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 8), frameon=False,
               fontsize=8.5, bbox_to_anchor=(0.5, -0.06))
    sil = [b.quality.silhouette for b in bundles]
    right.plot(range(len(bundles)), sil, marker="o", color="#59a14f")
    for pos, b in enumerate(bundles):
        note = "forced" if b.forced else f"rollback of v{b.rolled_back_from}" if b.rolled_back_from else ""
        if note:
            right.annotate(note, (pos, sil[pos]), textcoords="offset points", xytext=(0, 8),
                           ha="center", fontsize=8, color="#c0392b")
    right.set_xticks(range(len(bundles)), labels)
    right.set_ylabel("sampled silhouette on its window")
    right.set_title("Silhouette by version", loc="left", fontsize=10.5)
    lo = min(sil)
    right.set_ylim(min(0.0, lo - 0.05), 1.0)
    for ax in (left, right):
        style(ax)
    return png(fig)


# --- tables -----------------------------------------------------------------------------------
def fmt(value: float) -> str:
    """Numbers for people: thousands separators, fewer decimals as values grow.

    >>> fmt(1812.456), fmt(58.04), fmt(2.345), fmt(0.1234)
    ('1,812', '58.0', '2.35', '0.123')
    """
    a = abs(value)
    if a >= 1000:
        return f"{value:,.0f}"
    if a >= 10:
        return f"{value:,.1f}"
    if a >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def shade(ratio: float) -> str:
    """Cell background for a segment mean relative to the overall mean (blue high, orange low)."""
    if not np.isfinite(ratio) or ratio <= 0:
        return ""
    strength = min(abs(np.log2(ratio)) / 2.0, 1.0) * 0.55
    colour = "78, 121, 167" if ratio > 1 else "242, 142, 43"
    return f' style="background: rgba({colour}, {strength:.2f})"'


def profile_table(bundle: ModelBundle, sample: Sample | None) -> str:
    """One row per segment: share, mean raw value of every feature, channel mix, what stands out."""
    spec = bundle.features
    head = "".join(f"<th>{html.escape(n)}</th>" for n in spec.numeric)
    rows = []
    overall = sample.raw.mean(axis=0) if sample is not None else None
    for i, (sid, name) in enumerate(zip(bundle.segment_ids, bundle.segment_names, strict=True)):
        share = bundle.quality.shares[i]
        cells = ""
        stands_out = ""
        mix = ""
        if sample is not None and overall is not None:
            mine = sample.index == i
            if mine.any():
                means = sample.raw[mine].mean(axis=0)
                with np.errstate(divide="ignore", invalid="ignore"):
                    ratio = means / overall
                cells = "".join(f"<td class=num{shade(r)}>{fmt(m)}</td>"
                                for m, r in zip(means, ratio, strict=True))
                top = np.argsort(-np.abs(np.log2(np.clip(ratio, 1e-9, None))))[:2]
                stands_out = ", ".join(
                    f"{'high' if ratio[j] > 1 else 'low'} {spec.numeric[j]} ({ratio[j]:.1f}× avg)"
                    for j in top if np.isfinite(ratio[j]))
                mix = channel_mix([e for e, m in zip(sample.events, mine, strict=True) if m], spec.vocabulary)
            else:
                cells = f"<td colspan={spec.n_numeric} class=muted>no customer of the sample</td>"
        else:
            centre = spec.to_raw_numeric(bundle.centroid_array()[i : i + 1])[0]
            cells = "".join(f"<td class=num>{fmt(v)}</td>" for v in centre)
        rows.append(
            f"<tr><td><span class=dot style='background:{segment_colour(sid)}'></span><b>{sid}</b></td>"
            f"<td>{html.escape(name)}</td><td class=num>{share:.1%}</td>"
            f"<td class=num>{bundle.quality.sizes[i]:,}</td>{cells}"
            f"<td>{html.escape(mix)}</td><td>{html.escape(stands_out)}</td></tr>"
        )
    if overall is not None:
        rows.append("<tr class=overall><td></td><td>all customers</td><td class=num>100%</td>"
                    f"<td class=num>{sum(bundle.quality.sizes):,}</td>"
                    + "".join(f"<td class=num>{fmt(v)}</td>" for v in overall) + "<td></td><td></td></tr>")
    return (f"<table><thead><tr><th>id</th><th>segment</th><th>share</th><th>customers</th>{head}"
            "<th>channel mix</th><th>stands out</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


def channel_mix(events: list[Event], vocabulary: dict[str, list[str]]) -> str:
    """The two most common values of each categorical attribute, e.g. ``channel: app 70%, web 30%``."""
    parts = []
    for attribute in vocabulary:
        counts: dict[str, int] = {}
        for event in events:
            value = event.attributes.get(attribute, "other")
            counts[value] = counts.get(value, 0) + 1
        total = max(sum(counts.values()), 1)
        top = sorted(counts.items(), key=lambda kv: -kv[1])[:2]
        parts.append(f"{attribute}: " + ", ".join(f"{v} {n / total:.0%}" for v, n in top))
    return "; ".join(parts)


def label_change_table(bundles: list[ModelBundle]) -> str:
    """Per version: which segment ids were kept (with the matching distance), new, retired,
    restored by a rollback."""
    rows = []
    for b in reversed(bundles):
        m = b.label_mapping
        matched = ", ".join(
            str(c.segment_id)
            + (f" <span class=muted>({c.distance:.2f})</span>" if c.distance is not None else "")
            for c in sorted(m.matched, key=lambda c: c.segment_id))
        ids = {
            kind: " ".join(f"<span class=tag style='border-color:{segment_colour(c.segment_id)}'>"
                           f"{c.segment_id}</span>" for c in getattr(m, kind))
            for kind in ("new", "retired", "restored")
        }
        notes = []
        if b.rolled_back_from:
            notes.append(f"rollback of v{b.rolled_back_from}")
        if b.forced:
            notes.append("<b class=warn>forced past the gate</b>")
        threshold = f"{m.threshold:.3f}" if m.threshold is not None else ""
        notes += [html.escape(d.describe()) for d in m.structural]
        if m.moved_share is not None:
            notes.append(f"{m.moved_share:.1%} of customers change id")
        rows.append(
            f"<tr><td><b>v{b.version}</b></td>"
            f"<td>{'v' + str(b.previous_version) if b.previous_version else '-'}</td>"
            f"<td>{b.created_at:%Y-%m-%d %H:%M}</td><td class=num>{b.k}</td>"
            f"<td class=num>{b.quality.silhouette:.3f}</td><td>{matched or '-'}</td>"
            f"<td>{ids['new'] or '-'}</td><td>{ids['retired'] or '-'}</td><td>{ids['restored'] or '-'}</td>"
            f"<td class=num>{threshold}</td><td>{'; '.join(notes)}</td></tr>"
        )
    return ("<table><thead><tr><th>version</th><th>from</th><th>created (UTC)</th><th>K</th>"
            "<th>silhouette</th><th>kept ids (distance)</th><th>new ids</th><th>retired ids</th>"
            "<th>restored ids</th><th>threshold</th><th>note</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


def definition_list(items: list[tuple[str, str]]) -> str:
    return "<dl>" + "".join(f"<dt>{html.escape(k)}</dt><dd>{v}</dd>" for k, v in items) + "</dl>"


# --- the page ---------------------------------------------------------------------------------
CSS = """
body{font:14px/1.5 -apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;color:#1d2733;
 margin:0;background:#f4f6f9}
header{background:#1d3557;color:#fff;padding:22px 36px}
header h1{margin:0 0 4px;font-size:22px;font-weight:600} header p{margin:0;opacity:.8}
main{max-width:1180px;margin:0 auto;padding:18px 28px 48px}
section{background:#fff;border-radius:8px;box-shadow:0 1px 3px rgba(0,0,0,.08);padding:18px 22px;
 margin:18px 0}
h2{font-size:17px;margin:0 0 10px;color:#1d3557} p.lead{color:#4a5568;margin:0 0 12px}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin-top:4px}
.card{flex:1 1 140px;background:#f7f9fc;border:1px solid #e3e8ef;border-radius:6px;padding:10px 14px}
.card .v{font-size:20px;font-weight:600} .card .l{color:#66748a;font-size:12px}
table{border-collapse:collapse;width:100%;font-size:13px}
th{background:#eef2f7;text-align:left;font-weight:600;padding:6px 8px;border-bottom:1px solid #d6dde7}
td{padding:6px 8px;border-bottom:1px solid #edf0f4;vertical-align:top}
td:first-child{white-space:nowrap} td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.overall td{font-weight:600;background:#fafbfd}
.dot{display:inline-block;width:10px;height:10px;border-radius:50%;margin-right:6px}
.tag{display:inline-block;border:2px solid;border-radius:10px;padding:0 7px;margin:1px;font-weight:600}
.muted{color:#8a94a6} .warn{color:#c0392b} .note{background:#fff8e6;border-left:4px solid #f0b429;
 padding:8px 12px;margin:8px 0;color:#5c4400}
img{max-width:100%;height:auto;display:block;margin:6px 0}
.grid2{display:grid;grid-template-columns:1fr 1fr;gap:18px} @media(max-width:900px){.grid2{display:block}}
dl{display:grid;grid-template-columns:max-content 1fr;gap:4px 16px;margin:0} dt{color:#66748a}
dd{margin:0;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12.5px;word-break:break-all}
"""


def figure_html(name: str, data: bytes, alt: str) -> str:
    encoded = base64.b64encode(data).decode()
    return f'<img src="data:image/png;base64,{encoded}" alt="{html.escape(alt)}" title="{name}">'


def refusal_table(runs: list[dict[str, Any]]) -> str:
    """The recent quality-gate refusals of the run log (entries as ``TrainerState.runs`` decodes
    them) as an HTML table."""
    refusals = [r for r in runs if r.get("result") == "rejected"][:8]
    if not refusals:
        return "<p class=muted>No refusals in the recent run log.</p>"
    rows = "".join(
        f"<tr><td>{datetime.fromtimestamp(float(r['at']), UTC):%Y-%m-%d %H:%M:%S}</td>"
        f"<td>{html.escape(', '.join(f['check'] for f in r.get('failures', [])))}</td>"
        f"<td>{html.escape(str(r.get('detail', '')))}</td></tr>" for r in refusals)
    return ("<table><thead><tr><th>refused at (UTC)</th><th>check</th><th>why</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>")


def write_report(store: ModelStore, out_dir: str | Path, config: ReportConfig | None = None) -> Path:
    """Write ``index.html`` (figures embedded) and the figures as PNG files into ``out_dir``;
    returns the path of ``index.html``. Without ``config`` (no Kafka to read the training
    window from) the figures and columns that need customers are left out, with a note."""
    bundle = store.load_current()
    if bundle is None:
        raise BundleError("no model published yet: nothing to report")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bundles = []
    for version in store.versions():
        try:
            bundles.append(store.load(version))
        except BundleError as exc:
            log.warning("version skipped in the report", extra={"version": version, "error": str(exc)})
    sample, sample_note = (
        (None, "no Kafka settings given") if config is None else read_sample(config.window, bundle)
    )

    figures: dict[str, bytes] = {}
    if sample is not None:
        figures["pca_segments.png"] = pca_scatter(bundle, sample)
        figures["silhouette_per_customer.png"] = silhouette_plot(bundle, sample, bundle.lineage.random_state)
    scores = bundle.quality.k_scores
    computed_here = False
    if len(scores) < 2 and sample is not None:
        lo, hi = (config.k_min, config.k_max) if config is not None else (2, 10)
        scores = k_sweep(sample.encoded, range(lo, hi + 1), bundle.lineage.random_state)
        computed_here = True
    if len(scores) >= 2:
        figures["k_curves.png"] = k_curves(scores, bundle.k, computed_here)
    figures["versions.png"] = versions_plot(bundles or [bundle])
    for name, data in figures.items():
        (out / name).write_bytes(data)

    page = render_page(store, bundle, bundles, sample, sample_note, figures, computed_here)
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    log.info("report written", extra={"path": str(index), "figures": sorted(figures)})
    return index


def render_page(
    store: ModelStore, bundle: ModelBundle, bundles: list[ModelBundle], sample: Sample | None,
    sample_note: str, figures: dict[str, bytes], computed_here: bool,
) -> str:
    q, lin = bundle.quality, bundle.lineage
    status = ("<b class=warn>forced past the quality gate</b>" if bundle.forced
              else f"rollback of v{bundle.rolled_back_from}" if bundle.rolled_back_from
              else "passed the quality gate")
    cards = [
        (f"v{bundle.version}", "current model"), (str(bundle.k), "segments (K)"),
        (f"{q.silhouette:.3f}", "silhouette (higher is better)"),
        (f"{q.davies_bouldin:.3f}", "Davies-Bouldin (lower is better)"),
        (f"{lin.rows_used:,}", "customers in the training window"),
        (f"{min(q.shares):.1%}", "smallest segment share"),
    ]
    card_html = "".join(f"<div class=card><div class=v>{v}</div><div class=l>{label}</div></div>"
                        for v, label in cards)
    note = f"<div class=note>Customer-level figures: {html.escape(sample_note)}.</div>" if sample_note else ""

    def fig(name: str, alt: str) -> str:
        if name in figures:
            return figure_html(name, figures[name], alt)
        return f"<p class=muted>Not drawn: {html.escape(sample_note or 'no data')}.</p>"

    k_text = (f"K={bundle.k} was chosen by {html.escape(q.k_selection)} (curves below)."
              if not computed_here and len(q.k_scores) >= 2 else
              f"K is fixed at {bundle.k} by configuration; the curves show how other values of K "
              "would have scored on this window (computed for this report).")
    gate = ", ".join(f"{html.escape(str(k))}={html.escape(fmt(v) if isinstance(v, float) else str(v))}"
                     for k, v in q.gate.items()) or "-"
    ranges = ", ".join(f"p{r.partition}:{r.start}-{r.end}" for r in lin.partitions)
    window = (f"{datetime.fromtimestamp(lin.window_start_ms / 1000, UTC):%Y-%m-%d %H:%M:%S} → "
              f"{datetime.fromtimestamp(lin.window_end_ms / 1000, UTC):%Y-%m-%d %H:%M:%S} UTC")
    logs = bundle.features.log_features
    scaler_text = (bundle.features.scaler + (f", signed log1p on {', '.join(logs)}" if logs else "")
                   + (", clipped at the training quantiles" if bundle.features.clip_low else ""))
    lineage = definition_list([
        ("topic", html.escape(lin.topic)), ("offsets (end exclusive)", html.escape(ranges) or "-"),
        ("time window", window),
        ("rows read / invalid / used", f"{lin.rows_read:,} / {lin.rows_invalid:,} / {lin.rows_used:,}"),
        ("training matrix sha256", html.escape(lin.data_sha256)), ("random_state", str(lin.random_state)),
        ("libraries", html.escape(", ".join(f"{k} {v}" for k, v in lin.libraries.items()))),
        ("fit parameters", html.escape(", ".join(f"{k}={v}" for k, v in lin.params.items()))),
        ("scaler", html.escape(scaler_text)),
        ("feature warnings", html.escape("; ".join(q.feature_warnings)) or "none"),
        ("quality gate", gate),
        ("reproduce", f"<code>python -m trainer reproduce {bundle.version}</code>"),
    ])
    refusal_html = refusal_table(TrainerState.of(store).runs())
    profile_lead = (
        f"What a typical customer of each segment looks like: mean feature values in their own "
        f"units over {len(sample.events):,} customers of the training window (blue: above the "
        f"overall mean, orange: below)." if sample is not None else
        "Each segment's centroid in the features' own units (the training window was not read, "
        "so there are no per-customer means).")
    return f"""<!doctype html>
<html lang=en><head><meta charset=utf-8><meta name=viewport content="width=device-width, initial-scale=1">
<title>Segmentation report: model v{bundle.version}</title><style>{CSS}</style></head>
<body><header><h1>Customer segmentation: model v{bundle.version}</h1>
<p>{html.escape(lin.topic)} · created {bundle.created_at:%Y-%m-%d %H:%M} UTC · {status} ·
report generated {datetime.now(UTC):%Y-%m-%d %H:%M} UTC</p></header><main>
<section><h2>At a glance</h2><div class=cards>{card_html}</div>{note}</section>
<section><h2>Segments</h2><p class=lead>{profile_lead} Names come from the names file; unnamed
segments get a default.</p>
{profile_table(bundle, sample)}</section>
<section><h2>Segments in feature space</h2><p class=lead>Each dot is a customer, placed on the two
directions along which customers differ most (PCA of the scaled features). Well separated clouds
mean segments a campaign can tell apart.</p>{fig("pca_segments.png", "PCA scatter by segment")}</section>
<section><h2>How clearly each customer belongs</h2><p class=lead>Silhouette per sampled customer:
wide blades to the right are segments with clear members; blades reaching below zero are customers
closer to another segment.</p>{fig("silhouette_per_customer.png", "per-customer silhouette")}</section>
<section><h2>Choosing K</h2><p class=lead>{k_text} Inertia always falls as K grows, so the elbow is
shown but never decides alone.</p>{fig("k_curves.png", "elbow and silhouette over K")}</section>
<section><h2>Across versions</h2><p class=lead>Segment ids are stable: a colour is one segment
across all versions. A new colour is a new segment; a colour that disappears was retired.</p>
{fig("versions.png", "segment shares and silhouette by version")}
<h2 style="margin-top:18px">Label changes</h2><p class=lead>How each version's segment ids relate to
the version before it: ids kept by matching centroids (distance in standard deviations of the new
segment's spread, kept when below the threshold), fresh ids for new segments (never reused), retired
ids, and ids a
rollback brought back.</p>{label_change_table(bundles)}</section>
<section><h2>Recent quality-gate refusals</h2>{refusal_html}</section>
<section><h2>Lineage</h2>{lineage}</section>
</main></body></html>
"""
