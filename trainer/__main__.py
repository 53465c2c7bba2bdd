"""``python -m trainer once|run|show|history|rollback|unpin|promote|discard|reproduce|report``."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

import redis
from confluent_kafka import KafkaException

from segmentation import logs
from segmentation.baseline import baseline_of
from segmentation.bundle import BundleError, ModelBundle
from segmentation.features import FeatureConfig
from segmentation.kafka import ensure_topics, reader_config
from segmentation.metrics import TrainerMetrics, serve
from segmentation.model_log import ModelLog, ModelLogError, sync_store
from segmentation.readback import Readback
from segmentation.settings import Settings, load_settings
from segmentation.store import (
    ModelStore,
    PublishConflict,
    RedisRefused,
    ReplicaStates,
    TrainerState,
    check_redis,
    connect,
)
from trainer.challenger import ChallengerRefused, PromotionRule, tally
from trainer.fit import KConfig
from trainer.gate import GateLimits
from trainer.models_topic import ModelTopic
from trainer.operations import (
    PromotionConfig,
    ReproduceConfig,
    auto_promote,
    discard,
    pin,
    promote,
    reproduce,
    rollback,
)
from trainer.pipeline import MatchConfig, TrainConfig, train_once
from trainer.schedule import Schedule, ScheduleConfig
from trainer.segment_ids import load_names
from trainer.window import WindowConfig

if TYPE_CHECKING:
    from trainer.html_report import ReportConfig

log = logging.getLogger("trainer")

CATCH_UP_EVERY_S = 5.0


# --- each component's configuration, from the settings (only here and in the tools) -------------
def model_topic(settings: Settings) -> ModelTopic:
    """The models topic; segmentation's ``ModelLog`` and ``sync_store`` take the settings."""
    return ModelTopic(log=functools.partial(ModelLog, settings), sync=functools.partial(sync_store, settings))


def window_config(settings: Settings) -> WindowConfig:
    return WindowConfig(
        topic=settings.events_topic, window_s=settings.window_s, max_rows=settings.max_rows,
        contract=settings.input_contract(), max_abs_feature=settings.max_abs_feature,
        sample_salt=settings.sample_salt, reader=reader_config(settings, "trainer"),
        probe=reader_config(settings, "trainer-probe"),
    )


def k_config(settings: Settings) -> KConfig:
    return KConfig(k=settings.k, k_min=settings.k_min, k_max=settings.k_max, n_init=settings.n_init,
                   random_state=settings.random_state, silhouette_sample=settings.silhouette_sample,
                   stability_sample=settings.stability_sample, numeric_columns=len(settings.features))


def gate_limits(settings: Settings) -> GateLimits:
    return GateLimits(
        min_share=settings.gate_min_share,
        min_separation=settings.gate_min_separation,
        silhouette_margin=settings.gate_silhouette_margin,
        min_spread_separation=settings.gate_min_spread_separation,
        min_silhouette=settings.gate_min_silhouette,
        max_davies_bouldin=settings.gate_max_davies_bouldin,
        max_silhouette_drop=settings.gate_max_silhouette_drop,
        max_davies_bouldin_rise=settings.gate_max_davies_bouldin_rise,
        silhouette_budget=settings.gate_silhouette_budget,
        max_structural_share=settings.gate_max_structural_share,
    )


def train_config(settings: Settings) -> TrainConfig:
    return TrainConfig(
        window=window_config(settings), features=FeatureConfig.of(settings), k=k_config(settings),
        gate=gate_limits(settings),
        matching=MatchConfig(settings.match_threshold, settings.match_max_spread, settings.names_file),
        min_rows=settings.min_rows, lock_ttl_s=settings.lock_ttl_s, models=model_topic(settings),
    )


def schedule_config(settings: Settings) -> ScheduleConfig:
    return ScheduleConfig(
        train_interval_s=settings.train_interval_s, drift_retrain_after_s=settings.drift_retrain_after_s,
        drift_retrain_threshold=settings.drift_retrain_threshold,
        novelty_retrain_share=settings.novelty_retrain_share,
    )


def promotion_config(settings: Settings) -> PromotionConfig:
    return PromotionConfig(models=model_topic(settings), lock_ttl_s=settings.lock_ttl_s,
                           features=FeatureConfig.of(settings))


def promotion_rule(settings: Settings) -> PromotionRule:
    return PromotionRule(settings.challenger_promote_after, settings.challenger_min_agreement)


def reproduce_config(settings: Settings) -> ReproduceConfig:
    return ReproduceConfig(window=window_config(settings), k=k_config(settings),
                           clip_margin=settings.clip_margin)


def report_config(settings: Settings) -> ReportConfig:
    from trainer.html_report import ReportConfig  # matplotlib: only for the report

    return ReportConfig(window=window_config(settings), k_min=settings.k_min, k_max=settings.k_max)


def bundle_summary(bundle: ModelBundle) -> dict[str, Any]:
    return {
        "version": bundle.version,
        "created_at": bundle.created_at.isoformat(),
        "previous_version": bundle.previous_version,
        "rolled_back_from": bundle.rolled_back_from,
        "forced": bundle.forced,
        "k": bundle.k,
        "segments": [
            {"segment_id": sid, "segment": name, "size": size, "share": round(share, 4)}
            for sid, name, size, share in zip(
                bundle.segment_ids, bundle.segment_names, bundle.quality.sizes,
                bundle.quality.shares, strict=True,
            )
        ],
        "silhouette": bundle.quality.silhouette,
        "davies_bouldin": bundle.quality.davies_bouldin,
        "inertia": bundle.quality.inertia,
        "label_mapping": {
            kind: [c.segment_id for c in getattr(bundle.label_mapping, kind)]
            for kind in ("matched", "new", "retired", "restored")
        },
        "diff": diff_summary(bundle),
        "feature_warnings": bundle.quality.feature_warnings,
        "lineage": bundle.lineage.model_dump(),
    }


def diff_summary(bundle: ModelBundle) -> dict[str, Any]:
    """What the retrain did to each segment (kept, drifted, split, merged, born, retired), how it
    was matched and the share of customers whose id changes."""
    m = bundle.label_mapping
    return {"method": m.method, "moved_share": m.moved_share, "structural_share": m.structural_share,
            "segments": [d.describe() for d in m.diff]}


def gate_summary(bundle: ModelBundle) -> dict[str, Any]:
    """How the bundle got past the quality gate, and the accepted baseline it carries."""
    gate = bundle.quality.gate
    overridden = str(gate.get("overridden", ""))
    baseline = baseline_of(bundle)
    return {
        "passed": not bundle.forced, "forced": bundle.forced,
        "operator_accepted": gate.get("operator_accepted") is True,
        "overridden": [c for c in overridden.split(",") if c],
        "baseline": {"silhouette": round(baseline.silhouette, 4),
                     "davies_bouldin": round(baseline.davies_bouldin, 4),
                     "accepted_version": baseline.version},
        "below_baseline": round(baseline.silhouette - bundle.quality.silhouette, 4),
        "held": held_summary(gate),
    }


def held_summary(gate: dict[str, float | str | bool]) -> str | None:
    """Why a retrain published another model than the one it chose (``trainer.refit.assess``'s
    held candidates), in words; None when it published its choice.

    >>> held_summary({"k_fallback_from": 5.0, "continued_current_segments": True, "retired_emptied": "3",
    ...               "refused_checks": "min_share"})
    'K=5 was chosen and refused (min_share): the current segments were refitted, emptied segments 3 retired'
    >>> held_summary({}) is None
    True
    """
    chosen = gate.get("k_fallback_from")
    if not isinstance(chosen, int | float) or isinstance(chosen, bool):
        return None
    what = ("the current segments were refitted" if gate.get("continued_current_segments") is True
            else "the refit at another K passed")
    emptied = gate.get("retired_emptied")
    if isinstance(emptied, str) and emptied:
        what += f", emptied segments {emptied} retired"
    refused = gate.get("refused_checks")
    why = f" ({refused})" if isinstance(refused, str) and refused else ""
    return f"K={int(chosen)} was chosen and refused{why}: {what}"


def challenger_summary(store: ModelStore, current: int | None) -> dict[str, Any] | None:
    """The challenger (None: none), whether it is stale (trained against another model than the
    current one), and what the replicas report about it."""
    try:
        bundle = store.challenger()
    except BundleError as exc:
        return {"error": str(exc)}
    if bundle is None:
        return None
    full = bundle_summary(bundle)
    summary = {key: full[key] for key in ("version", "previous_version", "created_at", "forced", "k",
                                          "segments", "silhouette", "davies_bouldin", "label_mapping",
                                          "diff")}
    summary["stale"] = bundle.previous_version != current
    summary["shadow"] = dataclasses.asdict(tally(ReplicaStates.of(store).all(), bundle.version))
    return summary


def print_challenger(challenger: dict[str, Any] | None, current: int) -> None:
    if challenger is None:
        return
    if "error" in challenger:
        print(f"challenger slot invalid ({challenger['error']}): `python -m trainer discard`")
        return
    stale = (f"  STALE: v{current} is current, `discard` it" if challenger["stale"]
             else "  (`promote` or `discard`)")
    print(f"challenger v{challenger['version']} (trained against v{challenger['previous_version']})"
          f" created {challenger['created_at']}  K={challenger['k']}"
          f"  silhouette={challenger['silhouette']:.3f}  davies-bouldin={challenger['davies_bouldin']:.3f}"
          + ("  FORCED past the quality gate" if challenger["forced"] else "") + stale)
    shadow = challenger["shadow"]
    if shadow["events"]:
        print(f"  in the shadow: {shadow['events']} events on {shadow['replicas']} replicas, agreement "
              f"{shadow['agreed'] / shadow['events']:.1%}, silhouette {shadow['silhouette']:.3f} against "
              f"the champion's {shadow['champion_silhouette']:.3f}")
    for seg in challenger["segments"]:
        print(f"  {seg['segment_id']:>4}  {seg['share']:7.2%}  {seg['size']:>7}  {seg['segment']}")


def _when(run: dict[str, Any]) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(float(run.get("at", 0))))


def _checks(run: dict[str, Any]) -> str:
    return ",".join(str(f.get("check")) for f in run.get("failures", []))


def cmd_show(store: ModelStore, as_json: bool) -> int:
    bundle = store.load_current()
    if bundle is None:
        print("no model published yet", file=sys.stderr)
        return 1
    summary = bundle_summary(bundle)
    state = TrainerState.of(store)
    summary["pinned"] = state.pinned()
    summary["gate"] = gate_summary(bundle)
    runs = state.runs()
    summary["last_run"] = runs[0] if runs else None
    summary["challenger"] = challenger_summary(store, bundle.version)
    if as_json:
        print(json.dumps(summary, indent=2))
        return 0
    if summary["pinned"] is not None:
        print(f"pinned by a rollback (v{summary['pinned']}): scheduled retrains wait for `unpin`")
    print(f"model v{bundle.version} (from v{bundle.previous_version}) created {summary['created_at']}"
          f"  K={bundle.k}  silhouette={bundle.quality.silhouette:.3f}"
          f"  davies-bouldin={bundle.quality.davies_bouldin:.3f}")
    gate, base = summary["gate"], summary["gate"]["baseline"]
    accepted = f" (v{base['accepted_version']})" if base["accepted_version"] is not None else ""
    status = ("FORCED past the quality gate: " + ", ".join(gate["overridden"]) if gate["forced"]
              else "passed the quality gate")
    if gate["operator_accepted"]:
        status += " and accepted by an operator as the new baseline"
    below = gate["below_baseline"]
    print(f"  {status}; accepted baseline{accepted}: silhouette={base['silhouette']:.3f}"
          f"  davies-bouldin={base['davies_bouldin']:.3f}"
          + (f"  (this model is {below:.3f} below it)" if below > 0 else ""))
    if gate["held"]:
        print(f"  held: {gate['held']} (`trainer once --accept` publishes the refused change)")
    for seg in summary["segments"]:
        print(f"  {seg['segment_id']:>4}  {seg['share']:7.2%}  {seg['size']:>7}  {seg['segment']}")
    last = summary["last_run"]
    if last is not None and last.get("result") == "rejected":
        print(f"last run refused at {_when(last)} ({_checks(last)}): {last.get('detail', '')}")
    print_challenger(summary["challenger"], bundle.version)
    return 0


def cmd_history(store: ModelStore, as_json: bool) -> int:
    rows: list[dict[str, Any]] = []
    for version in store.versions():
        try:
            b = store.load(version)
        except BundleError as exc:
            rows.append({"version": version, "error": str(exc)})
            continue
        gate = gate_summary(b)
        rows.append({
            "version": b.version, "created_at": b.created_at.isoformat(), "k": b.k,
            "silhouette": round(b.quality.silhouette, 4),
            "davies_bouldin": round(b.quality.davies_bouldin, 4),
            "sizes": dict(zip(map(str, b.segment_ids), b.quality.sizes, strict=True)),
            "matched": len(b.label_mapping.matched), "new": [c.segment_id for c in b.label_mapping.new],
            "retired": [c.segment_id for c in b.label_mapping.retired],
            "restored": [c.segment_id for c in b.label_mapping.restored],
            "structural": [d.describe() for d in b.label_mapping.structural],
            "moved_share": b.label_mapping.moved_share,
            "forced": b.forced, "overridden": gate["overridden"],
            "operator_accepted": gate["operator_accepted"],
            "baseline_silhouette": gate["baseline"]["silhouette"],
            "rolled_back_from": b.rolled_back_from,
            "previous_version": b.previous_version,
        })
    refused = [r for r in TrainerState.of(store).runs() if r.get("result") == "rejected"]
    if as_json:
        print(json.dumps({"versions": rows, "recent_refusals": refused}, indent=2))
        return 0
    try:
        current = store.current_version()
    except BundleError:  # a pointer that is not a version (reported): no version is marked
        current = None
    for r in rows:
        mark = "*" if r["version"] == current else " "
        if "error" in r:
            print(f"{mark} v{r['version']}: {r['error']}")
            continue
        extra = f" forced({','.join(r['overridden'])})" if r["forced"] else ""
        extra += " accepted-by-operator" if r["operator_accepted"] else ""
        extra += f" rollback-of-v{r['rolled_back_from']}" if r["rolled_back_from"] else ""
        extra += f" restored={r['restored']}" if r["restored"] else ""
        print(f"{mark} v{r['version']:<4} {r['created_at'][:19]} K={r['k']} sil={r['silhouette']:.3f}"
              f" db={r['davies_bouldin']:.3f} baseline={r['baseline_silhouette']:.3f}"
              f" matched={r['matched']} new={r['new']}"
              f" retired={r['retired']} sizes={r['sizes']}{extra}")
    for run in refused[:10]:
        print(f"  refused at {_when(run)} ({_checks(run)}): {run['detail']}")
    return 0


def catch_up(models: ModelTopic, store: ModelStore) -> None:
    """Rebuild the Redis cache from the models topic if Redis lost it (the pin included, so a
    rolled-back model is not replaced by a retrain because Redis restarted)."""
    try:
        models.sync(store)
    except (ModelLogError, KafkaException, redis.RedisError) as exc:
        log.warning("model cache not checked against the models topic", extra={"error": str(exc)})


def cmd_run(settings: Settings, store: ModelStore, metrics: TrainerMetrics) -> int:
    stop = {"flag": False}

    def on_signal(signum: int, _frame: object) -> None:
        if stop["flag"]:
            sys.exit(1)
        stop["flag"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    schedule = Schedule(schedule_config(settings), metrics.redis_errors)
    models, config = model_topic(settings), train_config(settings)
    promotion, rule = promotion_config(settings), promotion_rule(settings)
    metrics.up.set(1)
    log.info("trainer running", extra={"interval_s": settings.train_interval_s})
    next_check = 0.0
    while not stop["flag"]:
        if time.monotonic() >= next_check:
            catch_up(models, store)
            if auto_promote(promotion, rule, store, metrics) is not None:
                schedule.ran("published")
            next_check = time.monotonic() + CATCH_UP_EVERY_S
        reason = schedule.due(store)
        if reason:
            log.info("training", extra={"reason": reason})
            result = train_once(config, store, metrics, challenger=settings.challenger)
            schedule.ran(result.result)
        time.sleep(0.5)
    metrics.up.set(0)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    once = sub.add_parser(
        "once", help="one training run now (exit 0 published or challenger, 1 failed, 2 refused, 3 skipped)"
    )
    once.add_argument("--force", action="store_true",
                      help="publish even if the gate refuses (the accepted baseline stays)")
    once.add_argument("--accept", action="store_true",
                      help="as --force, and make this model the accepted quality baseline "
                      "(the customer base really changed)")
    once.add_argument("--challenger", action="store_true",
                      help="store the model as the challenger (scored in the shadow) instead of "
                      "making it current")
    sub.add_parser("run", help="train periodically (and early on sustained drift)")
    for name in ("show", "history"):
        p = sub.add_parser(name)
        p.add_argument("--json", action="store_true")
    rb = sub.add_parser("rollback", help="make an earlier version's model current again")
    rb.add_argument("version", type=int)
    sub.add_parser("unpin", help="let scheduled retrains replace a rolled-back model again")
    sub.add_parser("promote", help="make the challenger current (exit 1 if none, or stale)")
    sub.add_parser("discard", help="drop the challenger")
    rp = sub.add_parser("reproduce", help="refit a version from its recorded offsets")
    rp.add_argument("version", type=int)
    rp.add_argument("--tolerance", type=float, default=1e-6)
    rep = sub.add_parser("report", help="HTML report with figures")
    rep.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    settings = load_settings()
    logs.configure(settings.log_level, settings.log_json)
    store = ModelStore(connect(settings), settings.redis_prefix, Readback.of(settings))
    try:
        check_redis(store.client)
    except RedisRefused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.command in ("rollback", "unpin"):  # once and run catch up themselves; reads never write
        catch_up(model_topic(settings), store)
    try:
        return run_command(args, settings, store)
    except (BundleError, PublishConflict, ChallengerRefused) as exc:
        # An operator error (unknown or invalid version, a trainer published meanwhile): say
        # why in one line, no traceback.
        print(f"error: {exc}", file=sys.stderr)
        return 1


def run_command(args: argparse.Namespace, settings: Settings, store: ModelStore) -> int:
    if args.command == "show":
        return cmd_show(store, args.json)
    if args.command == "history":
        return cmd_history(store, args.json)
    if args.command == "rollback":
        version = rollback(model_topic(settings), FeatureConfig.of(settings), store, args.version)
        print(f"v{args.version} is current again as v{version}; scheduled retrains are held "
              f"until `python -m trainer unpin`")
        return 0
    if args.command == "unpin":
        was_pinned = pin(model_topic(settings), store, None)
        print("scheduled retrains resume" if was_pinned else "nothing was pinned")
        return 0
    if args.command == "promote":
        print(json.dumps(promote(promotion_config(settings), store, TrainerMetrics())))
        return 0
    if args.command == "discard":
        print(json.dumps(discard(model_topic(settings), store, TrainerMetrics())))
        return 0
    if args.command == "reproduce":
        outcome = reproduce(reproduce_config(settings), store, args.version, args.tolerance)
        print(json.dumps(outcome, indent=2))
        return 0 if outcome["reproduced"] else 1
    if args.command == "report":
        from trainer.html_report import write_report

        path = write_report(store, args.out, report_config(settings))
        print(f"report written to {path}")
        return 0

    try:
        load_names(settings.names_file)  # a wrong names file stops the start, not every run
    except ValueError as exc:
        print(f"invalid settings: SEG_NAMES_FILE: {exc}", file=sys.stderr)
        return 2
    try:
        ensure_topics(settings)
    except KafkaException as exc:
        print(f"error: Kafka refused the setup: {exc}", file=sys.stderr)
        return 1
    metrics = TrainerMetrics()
    store.readback.counter = metrics.readback_rejected
    if settings.metrics_port:
        serve(metrics.registry, settings.metrics_port, host=settings.metrics_host)
    if args.command == "once":
        result = train_once(train_config(settings), store, metrics, force=args.force, accept=args.accept,
                            challenger=args.challenger)
        print(json.dumps({"result": result.result, "version": result.version,
                          "forced": result.forced, "detail": result.detail}))
        return {"published": 0, "challenger": 0, "failed": 1, "rejected": 2, "skipped": 3,
                "no_structure": 4}[result.result]
    return cmd_run(settings, store, metrics)


if __name__ == "__main__":
    sys.exit(main())
