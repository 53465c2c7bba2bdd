"""``make bench``: the consumer and the trainer measured on the real local stack, every comparison
a ratio of two contenders measured in the same run on the same generated events (the machines are
shared and noisy; absolute numbers are printed for context). Prints one table, writes
``bench/results/latest.json``, and exits 1 when a target is missed.

Two workloads (``bench/workloads.py``): ``returning`` (5,000 customers cycled, ``BENCH_EVENTS``
events) and ``arriving`` (``BENCH_ARRIVING_EVENTS`` events, half of them a new customer's first,
5% of the rest a change of behaviour: 100,000 customers in the full run). Throughput, the stage
table and the latencies run on both.

``BENCH_QUICK=1`` (or ``--quick``): about a minute, small sizes, no targets, written to
``bench/results/quick.json`` (CI runs it to check that every
measure still runs). ``BENCH_EVENTS`` and ``BENCH_ROUNDS`` override the throughput sizes.
Sections can be skipped with ``BENCH_SKIP=trainer,scaleout`` (names: throughput, model, latency,
trainer, window, changes, scaleout).
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import confluent_kafka

from bench import consumers, latency, model_step, trainer_cost
from bench.stage import (
    cleanup,
    clear_customers,
    cpu_meter,
    fresh_settings,
    make_values,
    prepare,
    produce,
    topic_bytes,
    with_output,
)
from bench.workloads import Workload, arriving, returning
from segmentation.kafka import ensure_topics
from segmentation.metrics import TrainerMetrics
from segmentation.store import ModelStore, connect
from trainer.__main__ import train_config
from trainer.pipeline import train_once

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Plan:
    quick: bool
    events: int
    rounds: int
    rate_seconds: float
    rates: list[int]
    ramp: list[int]
    fit_rows: list[int]
    auto_rows: int
    minibatch_rows: int
    scale_events: int
    window_events: int
    rebuild_customers: list[int]
    arriving_events: int
    arriving_customers: int
    skip: set[str] = field(default_factory=set)

    @classmethod
    def from_env(cls, argv: list[str]) -> Plan:
        quick = "--quick" in argv or os.environ.get("BENCH_QUICK", "") not in ("", "0")
        skip = {s for s in os.environ.get("BENCH_SKIP", "").split(",") if s}
        events = int(os.environ.get("BENCH_EVENTS", "8000" if quick else "30000"))
        rounds = int(os.environ.get("BENCH_ROUNDS", "1" if quick else "3"))
        arriving_events = int(os.environ.get("BENCH_ARRIVING_EVENTS", "16000" if quick else "200000"))
        if quick:
            return cls(True, events, rounds, 3.0, [2000, 5000], [], [20_000], 5_000, 50_000, 8000,
                       20_000, [20_000], arriving_events, arriving_events // 2, skip)
        return cls(False, events, rounds, 10.0, [2000, 5000], [10_000, 20_000, 40_000],
                   [100_000, 300_000, 1_000_000], 100_000, 1_000_000, 60_000, 1_000_000,
                   [1_000_000, 10_000_000], arriving_events, arriving_events // 2, skip)


TARGETS: dict[str, tuple[str, Callable[[float], bool]]] = {
    "e2e_vs_pipe": ("consumer end to end >= 0.5x the pipe limit", lambda r: r >= 0.5),
    "e2e_vs_naive": ("end to end >= 4x the naive River consumer", lambda r: r >= 4.0),
    "arriving_e2e_vs_pipe": ("arriving customers: end to end >= 0.4x the pipe limit", lambda r: r >= 0.4),
    "arriving_e2e_vs_naive_fast": ("arriving customers: end to end >= 3x the orjson + River consumer",
                                   lambda r: r >= 3.0),
    "arriving_p99_5000": ("arriving customers: p99 <= 50 ms at 5,000 events/s", lambda r: r <= 50.0),
    "after_start_p99": ("p99 <= 250 ms over 10 s from 5 s after a consumer start", lambda r: r <= 250.0),
    "model_vs_river": ("model step >= 30x River's", lambda r: r >= 30.0),
    "p99_2000": ("p99 <= 50 ms at 2,000 events/s", lambda r: r <= 50.0),
    "p99_5000": ("p99 <= 50 ms at 5,000 events/s", lambda r: r <= 50.0),
    "fit_1000000_s": ("trainer: 1M rows in <= 30 s", lambda r: r <= 30.0),
    "fit_1000000_rss": ("trainer: 1M rows peak RSS <= 1.5 GB", lambda r: r <= 1536.0),
}


def has_river() -> bool:
    try:
        import river  # noqa: F401
    except ImportError:
        return False
    return True


CONTENDERS = ("pipe", "service", "naive", "naive_fast")


def run_contender(name: str, s: Any, store: Any, n: int) -> float:
    if name == "pipe":
        return consumers.pipe(s, n)
    if name == "service":
        return consumers.service(s, store, n)
    if name == "naive":
        return consumers.naive(s, store, n)
    return consumers.naive_fast(s, store, n)


def throughput(plan: Plan, results: dict[str, Any], workload: Workload, settings: Any, store: Any) -> None:
    """Every contender on the workload's topic, ``plan.rounds`` times in turn: events/s, and
    the CPU each one cost the consumer process, Redis and the broker per event. Then the
    service's Redis commands and broker bytes per event, and one more run timed stage by stage."""
    n = len(workload)
    names = [c for c in CONTENDERS if has_river() or not c.startswith("naive")]
    if not has_river():
        results["not_done"]["naive River consumers"] = "River not installed: pip install -e '.[bench]'"
    runs: dict[str, list[float]] = {c: [] for c in names}
    cpu: dict[str, list[dict[str, float]]] = {c: [] for c in names}
    redis_commands: list[float] = []
    customers_stored, bytes_per_customer = 0, 0.0
    for r in range(plan.rounds):
        for name in names:
            s = with_output(settings, f"{workload.name}-{name}{r}")
            clear_customers(store)
            commands = store.client.info("stats")["total_commands_processed"]
            with cpu_meter() as used:
                took = run_contender(name, s, store, n)
            if name == "service":
                redis_commands.append((store.client.info("stats")["total_commands_processed"] - commands) / n)
                customers_stored, bytes_per_customer = customer_memory(store)
            runs[name].append(n / took)
            cpu[name].append({k: v / n * 1e6 for k, v in used.items()})
        rates = ", ".join(f"{k} {v[-1]:,.0f}/s" for k, v in runs.items())
        print(f"  {workload.name} round {r + 1}: {rates}", flush=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    cpu_med = {k: {part: statistics.median(run[part] for run in v) for part in v[0]} for k, v in cpu.items()}
    out = with_output(settings, f"{workload.name}-service0")
    outputs = {topic: topic_bytes(out, topic) for topic in (out.segments_topic, out.changes_topic) if topic}
    results["throughput"][workload.name] = {
        "events": n, "customers": workload.customers, "first_seen": workload.first_seen,
        "input_bytes_per_event": sum(map(len, workload.values)) / n + sum(map(len, workload.keys)) / n,
        "output_bytes_per_event": sum(b for _, b in outputs.values()) / n,
        "change_records_per_event": outputs.get(out.changes_topic or "", (0, 0))[0] / n,
        "redis_commands_per_event": statistics.median(redis_commands),
        "redis_customers": customers_stored, "redis_bytes_per_customer": bytes_per_customer,
        "rounds": plan.rounds, "per_round": runs, "median": med, "cpu_us_per_event": cpu_med,
    }
    prefix = "" if workload.name == "returning" else f"{workload.name}_"
    results["ratios"][f"{prefix}e2e_vs_pipe"] = med["service"] / med["pipe"]
    for naive in ("naive", "naive_fast"):
        if naive in med:
            results["ratios"][f"{prefix}e2e_vs_{naive}"] = med["service"] / med[naive]
    clear_customers(store)
    stages = consumers.service_stages(with_output(settings, f"{workload.name}-stages"), store, n)
    results["consumer_stages_us_per_event"][workload.name] = stages
    print("  stages, us/event: " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()), flush=True)


def customer_memory(store: Any, sample: int = 500) -> tuple[int, float]:
    """How many customers the consumer keeps in Redis under the run's prefix, and the mean of
    ``MEMORY USAGE`` (key, hash and Redis's own overhead) over a sample of them."""
    keys = list(itertools.islice(store.client.scan_iter(match=store.keys.customer("*"), count=1000), sample))
    if not keys:
        return 0, 0.0
    used = [store.client.memory_usage(k, samples=0) or 0 for k in keys]
    stored = sum(1 for _ in store.client.scan_iter(match=store.keys.customer("*"), count=5000))
    return stored, sum(used) / len(used)


def arriving_throughput(plan: Plan, results: dict[str, Any]) -> None:
    """The throughput measures on arriving customers, on a topic and model of their own."""
    workload = arriving(plan.arriving_events, plan.arriving_customers)
    print(f"  arriving: {len(workload):,} events, {workload.customers:,} customers "
          f"({workload.first_seen:.0%} of events a customer's first)", flush=True)
    settings, store = prepare(workload)
    try:
        throughput(plan, results, workload, settings, store)
    finally:
        cleanup(settings, store)


def model(plan: Plan, results: dict[str, Any], store: Any) -> None:
    if not has_river():
        raise SystemExit("River not installed: pip install -e '.[bench]'")
    bundle = store.load(1)
    x = model_step.encoded(bundle, make_values(min(plan.events, 30_000), seed=7))
    ours = statistics.median(model_step.ours(bundle, x) for _ in range(3))
    river = model_step.river(bundle, x)
    results["model_step"] = {"events": x.shape[0], "ours_per_s": ours, "river_per_s": river}
    results["ratios"]["model_vs_river"] = ours / river


def latencies(plan: Plan, results: dict[str, Any], settings: Any) -> None:
    """Both workloads at the fixed rates (the returning one then up the ramp), and the latency
    after a consumer's start at 5,000 events/s of arriving customers."""
    for workload in ("returning", "arriving"):
        rates = latency.latency(settings, plan.rates, plan.ramp if workload == "returning" else [],
                                plan.rate_seconds, workload)
        results["latency"] += [{**asdict(r), "sustained": r.sustained} for r in rates]
        prefix = "" if workload == "returning" else f"{workload}_"
        for r in rates:
            if r.target_per_s in plan.rates:
                results["ratios"][f"{prefix}p99_{r.target_per_s}"] = r.p99_ms
        if workload == "returning":
            sustained = [r.target_per_s for r in rates if r.sustained]
            results["latency_highest_sustained"] = max(sustained) if sustained else None
    start = latency.after_start(settings, 5000, "arriving", seconds=8.0 if plan.quick else 20.0,
                                after_s=1.0 if plan.quick else 5.0)
    results["after_start"] = asdict(start)
    results["ratios"]["after_start_p99"] = start.p99_after_ms
    print(f"  after a start at 5,000/s: p99 {start.p99_after_ms:,.0f} ms over 10 s from {start.after_s:.0f} s"
          f", steady (p99 <= 50 ms each second) from {start.steady_after_s} s", flush=True)


def trainer(plan: Plan, results: dict[str, Any]) -> None:
    fits = {}
    for n in plan.fit_rows:
        fits[n] = trainer_cost.in_subprocess("fit", n)
        print(f"  fit {n:,} rows: {fits[n]}", flush=True)
        if "seconds" in fits[n]:
            results["ratios"][f"fit_{n}_s"] = fits[n]["seconds"]
            results["ratios"][f"fit_{n}_rss"] = fits[n]["peak_rss_mb"]
    auto = trainer_cost.in_subprocess("auto", plan.auto_rows)
    print(f"  auto K {plan.auto_rows:,} rows: {auto}", flush=True)
    mini = trainer_cost.in_subprocess("minibatch", plan.minibatch_rows)
    print(f"  minibatch vs kmeans {plan.minibatch_rows:,} rows: {mini}", flush=True)
    results["trainer"] = {"fit": {str(k): v for k, v in fits.items()},
                          "auto_k": {"rows": plan.auto_rows, **auto},
                          "minibatch": {"rows": plan.minibatch_rows, **mini}}


def window(plan: Plan, results: dict[str, Any]) -> None:
    """The trainer's whole run on a window of ``window_events`` events from 100,000 customers:
    read the window (decode and validate every event, keep each customer's latest in the
    bounded sample), fit, gate, match, publish to the models topic and Redis."""
    customers = min(plan.window_events, 100_000)
    settings = fresh_settings()
    ensure_topics(settings)
    store = ModelStore(connect(settings), settings.redis_prefix)
    try:
        produce(settings, make_values(plan.window_events, seed=11, customers=customers),
                customers=customers)
        started = time.perf_counter()
        result = train_once(train_config(settings), store, TrainerMetrics())
        seconds = time.perf_counter() - started
    finally:
        cleanup(settings, store)
    if result.result != "published":
        raise RuntimeError(f"window run not published: {result.detail}")
    results["window"] = {"events": plan.window_events, "customers": customers,
                         "rows_used": min(customers, settings.max_rows), "seconds": seconds}
    print(f"  window of {plan.window_events:,} events to publish: {seconds:.1f} s", flush=True)


def changes(plan: Plan, results: dict[str, Any]) -> None:
    """Rebuilding a partition's last recorded segments from the changes topic: time, peak RSS
    and memory per customer, at each of ``plan.rebuild_customers``, then with the longest
    customer ids allowed (``SEG_MAX_ID_CHARS``): the per-customer worst case."""
    runs: list[dict[str, float]] = []
    sizes = [(n, 0) for n in plan.rebuild_customers]
    sizes.append((plan.rebuild_customers[0] // 10, fresh_settings().max_id_chars))
    for customers, id_chars in sizes:
        settings = fresh_settings()
        ensure_topics(settings)
        store = ModelStore(connect(settings), settings.redis_prefix)
        try:
            rebuild = consumers.change_rebuild(settings, customers, id_chars)
        finally:
            cleanup(settings, store)
        runs.append(rebuild)
        print(f"  change state rebuild: {rebuild['customers']:,} customers (ids of {rebuild['id_chars']:.0f} "
              f"chars) in {rebuild['seconds']:.1f} s over {rebuild['calls']:.0f} calls "
              f"({rebuild['per_s']:,.0f}/s), peak RSS {rebuild['peak_rss_mib']:,.0f} MiB, "
              f"{rebuild['bytes_per_customer']:.0f} B/customer", flush=True)
    results["change_rebuild"] = runs


def scaleout(plan: Plan, results: dict[str, Any]) -> None:
    settings, store = prepare(returning(plan.scale_events))
    try:
        one = latency.scale_out(settings, plan.scale_events, 1)
        two = latency.scale_out(settings, plan.scale_events, 2)
    finally:
        cleanup(settings, store)
    results["scale_out"] = {"events": plan.scale_events, "one_per_s": one, "two_per_s": two,
                            "ratio": two / one}


def machine() -> dict[str, Any]:
    cpu = ""
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    packages = ["confluent-kafka", "scikit-learn", "numpy", "pydantic", "redis", "river", "threadpoolctl"]
    versions: dict[str, str] = {}
    for p in packages:
        try:
            versions[p] = version(p)
        except Exception:  # noqa: BLE001 - river is an optional extra
            versions[p] = "not installed"
    return {"cores": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "librdkafka": confluent_kafka.libversion()[0], "kafka_broker": "4.1.1 (make stack)",
            "load_average_at_start": os.getloadavg(), "packages": versions}


def main(argv: list[str]) -> int:
    plan = Plan.from_env(argv)
    started = time.time()
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                               "quick": plan.quick, "machine": machine(), "ratios": {}, "not_done": {}}
    results.update({"throughput": {}, "consumer_stages_us_per_event": {}, "latency": []})
    sections = ["throughput", "model", "latency", "trainer", "window", "changes", "scaleout"]
    print(f"preparing {plan.events:,} events on a fresh topic ({'quick' if plan.quick else 'full'} run) ...",
          flush=True)
    settings, store = prepare(returning(plan.events))
    try:
        for name in sections:
            if name in plan.skip:
                results["not_done"][name] = "skipped (BENCH_SKIP)"
                continue
            print(f"{name} ...", flush=True)
            t = time.time()
            try:
                if name == "throughput":
                    throughput(plan, results, returning(plan.events), settings, store)
                    arriving_throughput(plan, results)
                elif name == "model":
                    model(plan, results, store)
                elif name == "latency":
                    latencies(plan, results, settings)
                elif name == "trainer":
                    trainer(plan, results)
                elif name == "window":
                    window(plan, results)
                elif name == "changes":
                    changes(plan, results)
                else:
                    scaleout(plan, results)
            except (Exception, SystemExit) as exc:  # noqa: BLE001 - one section must not lose the others
                results["not_done"][name] = f"{type(exc).__name__}: {exc}"
                print(f"  {name} failed: {exc}", flush=True)
            results.setdefault("section_seconds", {})[name] = round(time.time() - t, 1)
    finally:
        cleanup(settings, store)
    results["seconds"] = round(time.time() - started, 1)
    results["targets"] = {} if plan.quick else {
        key: {"target": text, "value": results["ratios"].get(key),
              "met": key in results["ratios"] and bool(check(results["ratios"][key]))}
        for key, (text, check) in TARGETS.items()
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    # a quick run never overwrites the full run that docs/benchmarks.md records
    name = "quick.json" if plan.quick else "latest.json"
    (RESULTS / name).write_text(json.dumps(results, indent=2, default=str) + "\n")
    from bench.docs_table import table

    print()
    print(table(results))
    missed = [k for k, t in results["targets"].items() if not t["met"]]
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
