"""The one table ``make bench`` prints (Markdown, pasted into docs/benchmarks.md)."""

from __future__ import annotations

from typing import Any


def _rate(v: float) -> str:
    return f"{v:,.0f}/s"


def _row(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


def table(r: dict[str, Any]) -> str:
    rows = [_row("measure", "baseline", "ours", "ratio / figure", "target"), "|---|---|---|---|---|"]
    targets = r.get("targets", {})

    def mark(*keys: str) -> str:
        marks = [("met" if targets[k]["met"] else "**missed**") for k in keys if k in targets]
        return ", ".join(marks) or "-"

    throughput = r.get("throughput", {})
    if "median" in throughput:  # one workload in results before 2026-12-06
        throughput = {"returning": throughput}
    for workload, t in throughput.items():
        m, n, prefix = t["median"], t["events"], "" if workload == "returning" else f"{workload}_"
        who = f"{workload}: {n:,} events"
        if "customers" in t:
            who += f", {t['customers']:,} customers, {t['first_seen']:.0%} of events a customer's first"
        bar = 0.5 if workload == "returning" else 0.4
        rows.append(_row(f"end to end vs pipe limit ({who}; median of {t['rounds']})",
                         f"pipe {_rate(m['pipe'])}",
                         f"consumer {_rate(m['service'])}", f"{m['service'] / m['pipe']:.2f}x (>= {bar}x)",
                         mark(f"{prefix}e2e_vs_pipe")))
        returning = workload == "returning"
        naives = {"naive": ("naive per-event River consumer (pydantic)", 4 if returning else None),
                  "naive_fast": ("orjson + River per-event consumer", None if returning else 3)}
        for key, (label, target) in naives.items():
            if key in m:
                want = f" (>= {target}x)" if target else ""
                rows.append(_row(f"{workload}: end to end vs {label}", f"{key} {_rate(m[key])}",
                                 f"consumer {_rate(m['service'])}", f"{m['service'] / m[key]:.1f}x{want}",
                                 mark(f"{prefix}e2e_vs_{key}")))
        if "cpu_us_per_event" in t:
            cpu = t["cpu_us_per_event"]

            def parts(c: dict[str, float]) -> str:
                return " / ".join(f"{c.get(k, float('nan')):.1f}" for k in ("consumer", "redis", "broker"))

            rows.append(_row(f"{workload}: CPU us per event (consumer process / Redis / broker)",
                             f"pipe {parts(cpu['pipe'])}", f"consumer {parts(cpu['service'])}",
                             ", ".join(f"{k} {parts(v)}" for k, v in cpu.items() if k.startswith("naive")),
                             "-"))
            stored = (f", Redis {t['redis_bytes_per_customer']:.0f} B/customer"
                      if t.get("redis_bytes_per_customer") else "")
            rows.append(_row(f"{workload}: what the consumer costs per event", "-",
                             f"{t['redis_commands_per_event']:.2f} Redis commands, "
                             f"{t['change_records_per_event']:.3f} change records{stored}",
                             f"{t['input_bytes_per_event']:.0f} B in, "
                             f"{t['output_bytes_per_event']:.0f} B out (key + value)", "-"))
    stages_by = r.get("consumer_stages_us_per_event", {})
    if "total_wall" in stages_by:  # one workload in results before 2026-12-06
        stages_by = {"returning": stages_by}
    for workload, st in stages_by.items():
        parts_ = ", ".join(f"{k} {v:.1f}" for k, v in st.items() if k != "total_wall")
        rows.append(_row(f"{workload}: consumer time by stage, us/event (one instrumented run)", "-",
                         f"{st['total_wall']:.1f} in all", parts_, "-"))
    if "model_step" in r:
        ms = r["model_step"]
        rows.append(_row(f"model step alone, assign + online update ({ms['events']:,} events)",
                         f"River {_rate(ms['river_per_s'])}", f"ours {_rate(ms['ours_per_s'])}",
                         f"{ms['ours_per_s'] / ms['river_per_s']:.0f}x (>= 30x)", mark("model_vs_river")))
    for lat in r.get("latency", []):
        workload = lat.get("workload", "returning")
        prefix = "" if workload == "returning" else f"{workload}_"
        rows.append(_row(
            f"{workload}: latency at {lat['target_per_s']:,} events/s "
            f"(produced {lat['produced_per_s']:,.0f}/s, "
            f"{lat['scored']:,}/{lat['events']:,} scored)", "-",
            f"p50 {lat['p50_ms']:.0f} ms, p99 {lat['p99_ms']:.0f} ms, max {lat['max_ms']:.0f} ms",
            ("sustained" if lat["sustained"] else "not sustained") + " (p99 <= 50 ms)",
            mark(f"{prefix}p99_{lat['target_per_s']}")))
    if r.get("latency"):
        best = r.get("latency_highest_sustained")
        rows.append(_row("highest producer rate sustained (all scored, p99 < 500 ms)", "-",
                         f"{best:,} events/s" if best else "none", "-", "-"))
    if "after_start" in r:
        a = r["after_start"]
        steady = "never" if a["steady_after_s"] is None else f"{a['steady_after_s']:.0f} s"
        rows.append(_row(f"{a['workload']}: latency after a consumer start, producer at {a['rate']:,}/s "
                         f"({a['scored']:,}/{a['events']:,} scored)", "-",
                         f"p99 {a['p99_after_ms']:,.0f} ms over the 10 s from {a['after_s']:.0f} s",
                         f"each second's p99 <= 50 ms from {steady} (<= 250 ms)", mark("after_start_p99")))
    trainer = r.get("trainer", {})
    for n, fit in trainer.get("fit", {}).items():
        what = f"trainer fit {int(n):,} rows (d=8, K=8, n_init=10)"
        figure = f"error: {fit['error']}" if "error" in fit else \
            f"{fit['seconds']:.1f} s, peak RSS {fit['peak_rss_mb']:,.0f} MB"
        rows.append(_row(what, "-", figure, "<= 30 s, <= 1.5 GB at 1M", mark(f"fit_{n}_s", f"fit_{n}_rss")))
    if "auto_k" in trainer:
        a = trainer["auto_k"]
        figure = f"error: {a['error']}" if "error" in a else \
            f"{a['seconds']:.1f} s, chose K={a['k']}, peak RSS {a['peak_rss_mb']:,.0f} MB"
        what = f"trainer automatic K over 2..12 ({a['rows']:,} rows, n_init=10)"
        rows.append(_row(what, "-", figure, "-", "-"))
    if "minibatch" in trainer:
        mb = trainer["minibatch"]
        what = f"MiniBatchKMeans vs KMeans ({mb['rows']:,} rows)"
        if "error" in mb:
            rows.append(_row(what, "-", f"error: {mb['error']}", "-", "-"))
        else:
            rows.append(_row(what, f"KMeans {mb['kmeans_s']:.1f} s", f"MiniBatch {mb['minibatch_s']:.1f} s",
                             f"{mb['speedup']:.1f}x faster, inertia {mb['inertia_gap'] * 100:+.2f}%", "-"))
    if "window" in r:
        w = r["window"]
        what = (f"trainer run: window of {w['events']:,} events ({w['customers']:,} customers, "
                f"{w['rows_used']:,} rows fitted) to publish")
        rows.append(_row(what, "-", f"{w['seconds']:.1f} s", "-", "-"))
    runs = r.get("change_rebuild", [])
    for c in runs if isinstance(runs, list) else [runs]:  # one dict in results before 2026-12-05
        memory = (f", peak RSS {c['peak_rss_mib']:,.0f} MiB, {c['bytes_per_customer']:.0f} B/customer"
                  if "peak_rss_mib" in c else "")
        ids = f", ids of {c['id_chars']:.0f} chars" if "id_chars" in c else ""
        rows.append(_row(f"segment changes: rebuild a partition's state ({c['customers']:,} customers{ids})",
                         "-", f"{c['seconds']:.2f} s ({_rate(c['per_s'])}){memory}", "-", "-"))
    if "scale_out" in r:
        so = r["scale_out"]
        rows.append(_row(f"scale-out, 6 partitions, {so['events']:,} events",
                         f"1 process {_rate(so['one_per_s'])}", f"2 processes {_rate(so['two_per_s'])}",
                         f"{so['ratio']:.2f}x", "-"))
    for name, why in r.get("not_done", {}).items():
        rows.append(_row(name, "not done", why, "-", "-"))
    return "\n".join(rows)
