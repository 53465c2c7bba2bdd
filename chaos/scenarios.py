"""The scenarios. Each one gets its own topics, consumer group, Redis prefix, replica and
transactional ids (``ScenarioRun``), starts real consumer processes, publishes a first model with
``python -m trainer once``, injects its fault while events flow, drains and counts."""

from __future__ import annotations

import json
import os
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from chaos import hostile, poison
from chaos.measure import (
    Fault,
    ScenarioResult,
    count_changes,
    count_delivery,
    count_processes,
    count_recovery,
)
from chaos.procs import ERROR_LINE, ConsumerPool, Proc, Procs
from chaos.stack import PrivateStack
from chaos.traffic import Collector, Observed, Traffic
from segmentation.kafka import delete_topics, ensure_topics, project_topics
from segmentation.settings import Settings
from segmentation.store import ModelStore, connect

MODES = ("at-least-once", "exactly-once")
TRAINER_RESULTS = {0: "published", 1: "failed", 2: "refused by the gate", 3: "skipped"}
TRAINER_NORMAL = (0, 2, 3)  # `trainer once` results; 1 (failed) or a crash counts as a trainer exit


@dataclass(frozen=True)
class Params:
    """Sizes and durations of one run of every scenario (``FULL`` or ``QUICK``)."""

    customers: int
    rate: float  # valid events/s while a scenario runs
    hostile_rounds: int  # every hostile kind this many times
    hostile_s: float
    kill_gap_s: float  # steady scoring before each consumer kill
    broker_s: float
    broker_down_s: float
    redis_s: float
    redis_down_s: float
    storm_s: float
    storm_rate: float
    storm_every_s: float
    trainer_kills: int
    permanent_s: float
    exit_wait_s: float
    drain_idle_s: float
    drain_max_s: float


FULL = Params(customers=2000, rate=300, hostile_rounds=3, hostile_s=30, kill_gap_s=5, broker_s=36,
              broker_down_s=6, redis_s=34, redis_down_s=10, storm_s=48, storm_rate=1000,
              storm_every_s=6, trainer_kills=6, permanent_s=8, exit_wait_s=60, drain_idle_s=60,
              drain_max_s=150)
QUICK = Params(customers=1000, rate=200, hostile_rounds=1, hostile_s=10, kill_gap_s=3, broker_s=20,
               broker_down_s=4, redis_s=20, redis_down_s=10, storm_s=20, storm_rate=500,
               storm_every_s=6, trainer_kills=3, permanent_s=4, exit_wait_s=45, drain_idle_s=12,
               drain_max_s=90)


class ScenarioFailed(RuntimeError):
    """The harness could not run the scenario (e.g. no first model): reported, not counted."""


class ScenarioRun:
    """One scenario in one delivery mode: its settings, processes, traffic and collector."""

    def __init__(self, name: str, mode: str, stack: PrivateStack, params: Params, log_dir: Path,
                 **overrides: Any) -> None:
        tag = f"{name}-{'eos' if mode == 'exactly-once' else 'alo'}-{uuid.uuid4().hex[:6]}"
        values: dict[str, Any] = {
            "kafka_bootstrap": stack.bootstrap, "redis_url": stack.redis_url,
            "events_topic": f"{tag}-events", "segments_topic": f"{tag}-segments",
            "dlq_topic": f"{tag}-dlq", "models_topic": f"{tag}-models", "changes_topic": f"{tag}-changes",
            "consumer_group": f"{tag}-group", "redis_prefix": tag, "replica_id": tag,
            "transactional_id": tag, "delivery": mode, "model_poll_s": 1.0, "n_init": 4,
            **overrides,
        }
        self.settings = Settings(**values)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SEG_")}
        env.update({f"SEG_{k.upper()}": str(v) for k, v in values.items()})
        self.stack = stack
        self.params = params
        self.procs = Procs(env, log_dir)
        self.traffic = Traffic(self.settings, tag, params.customers)
        self._collector: Collector | None = None
        self.pool: ConsumerPool | None = None
        self.result = ScenarioResult(name, mode)
        self.started = time.monotonic()
        self.rescued_at: float | None = None

    # --- setup ---------------------------------------------------------------------------------
    def start(self, replicas: int = 1, auto_restart: bool = True) -> None:
        """Topics, collector, consumers, a first batch (one event per customer), a first model,
        and every event of that batch scored."""
        ensure_topics(self.settings)
        self._collector = Collector(self.settings)
        self._collector.start()
        self.pool = ConsumerPool(self.procs, replicas, auto_restart)
        self.traffic.one_per_customer()
        trainer = self.train("trainer-first")
        if trainer.returncode != 0:
            raise ScenarioFailed(f"first model not published (trainer exit {trainer.returncode}): "
                                 + " | ".join(trainer.error_lines()))
        if self.drain():
            raise ScenarioFailed("the first batch was not scored: " + " | ".join(self.consumer_errors()))

    @property
    def collector(self) -> Collector:
        if self._collector is None:
            raise ScenarioFailed("not started")
        return self._collector

    def wait_for_output(self, since: float, timeout_s: float) -> bool:
        """Wait until some output was produced at or after ``since``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.collector.outputs_since(since):
                return True
            time.sleep(0.2)
        self.note(f"no output within {timeout_s:.0f} s of a restart")
        return False

    def model_store(self) -> ModelStore:
        return ModelStore(connect(self.settings), self.settings.redis_prefix)

    def train(self, name: str = "trainer", *args: str) -> Proc:
        return self.procs.run(name, ["trainer", "once", *args], timeout_s=180, normal_exits=TRAINER_NORMAL)

    # --- during ----------------------------------------------------------------------------------
    def fault(self, what: str, start: float, end: float) -> None:
        self.result.faults.append(Fault(what, start, end))

    def note(self, text: str) -> None:
        self.result.notes.append(text)

    def consumer_errors(self) -> list[str]:
        return [f"{p.name}: {ln}" for p in self.procs.all if p.name.startswith("consumer")
                for ln in p.error_lines(3)]

    def drain(self, quiet: bool = False) -> int:
        """Wait until every message sent has an output or a dead letter; give up when nothing
        new arrives for ``drain_idle_s`` (or after ``drain_max_s``). Returns how many are missing."""
        self.traffic.flush()
        sent = self.traffic.snapshot()
        began = time.monotonic()
        while True:
            missing = len(sent) - self.collector.accounted(sent)
            if missing <= 0:
                return 0
            idle = min(self.collector.idle_s(), time.monotonic() - began)
            if idle >= self.params.drain_idle_s or time.monotonic() - began >= self.params.drain_max_s:
                if not quiet:
                    self.note(f"not drained: {missing} of {len(sent)} messages had neither an output nor "
                              f"a dead letter after {time.monotonic() - began:.0f} s "
                              f"(nothing new for {idle:.0f} s)")
                return missing
            time.sleep(0.5)

    def drain_or_rescue(self) -> None:
        """Drain; if the consumers stalled, dump their stacks, restart them and drain again, so
        that a stall (the messages are still uncommitted) is told apart from a loss."""
        missing = self.drain(quiet=True)
        if not missing or self.pool is None:
            return
        self.result.stalled = missing
        self.rescued_at = time.time()
        self.note(f"STALLED: {missing} messages unhandled and nothing new for "
                  f"{self.params.drain_idle_s:.0f} s; the harness dumped the consumers' stacks "
                  f"(SIGABRT), restarted them and drained again")
        self.pool.rescue()
        self.drain()

    def versions_since(self, at: float) -> Counter[int]:
        """Model versions of the outputs produced at or after ``at``."""
        with self.collector.lock:
            return Counter(v for rows in self.collector.observed.outputs.values() for t, v in rows if t >= at)

    # --- end -------------------------------------------------------------------------------------
    def finish(self) -> ScenarioResult:
        """Drain, stop every process gracefully, count."""
        result = self.result
        try:
            if self._collector is not None and self._collector.is_alive():
                self.drain_or_rescue()
        finally:
            self.close()
        sent = self.traffic.snapshot()
        observed = self._collector.observed if self._collector is not None else Observed()
        count_delivery(result, sent, observed)
        count_changes(result, observed)
        count_recovery(result, sent, observed, self.rescued_at)
        result.produce_failed = sum(self.traffic.failed.values())
        if self.traffic.failed:
            self.note(f"produce failures (not counted as sent): {dict(self.traffic.failed)}")
        if observed.unreadable_outputs:
            self.note(f"{observed.unreadable_outputs} outputs were not JSON objects")
        if observed.unreadable_changes:
            self.note(f"{observed.unreadable_changes} change records were not the consumer's (not counted)")
        if observed.non_strict_outputs:
            self.note(f"{observed.non_strict_outputs} outputs held NaN or Infinity (not strict JSON)")
        count_processes(result, self.procs.all)
        count_processes(result, self.procs.all, "trainer")
        result.duration_s = time.monotonic() - self.started
        return result

    def close(self) -> None:
        self.traffic.stop.set()
        if self.pool is not None:
            self.pool.close()
        self.procs.stop_all()
        if self._collector is not None and self._collector.is_alive():
            self._collector.stop.set()
            self._collector.join(10)
        self.traffic.flush(10)
        try:
            delete_topics(self.settings, project_topics(self.settings))
        except Exception as exc:  # noqa: BLE001 - cleanup only; the disk is wiped on the next run
            self.note(f"topics not deleted: {exc}")


def _last_log(proc: Proc) -> str:
    """The message of a process's last structured log line (where a killed trainer was)."""
    lines = [ln for ln in proc.log_text().splitlines() if ERROR_LINE.match(ln) or " info " in ln]
    return lines[-1].split(": ", 1)[-1][:120] if lines else "none yet"


def _trainer_outcome(proc: Proc) -> str:
    """``published v7`` or ``failed: <last error line>`` from ``trainer once``'s output."""
    rc = proc.returncode
    outcome = TRAINER_RESULTS.get(rc if rc is not None else -1, f"exit {rc}")
    for line in proc.log_text().splitlines():
        if line.startswith("{") and '"result"' in line:
            data = json.loads(line)
            if data.get("version") is not None:
                outcome += f" v{data['version']}"
            if data.get("detail"):
                outcome += f" ({str(data['detail'])[:200]})"
    errors = proc.error_lines(2)
    return outcome + (" | " + " | ".join(errors) if errors and rc not in (0, 2, 3) else "")


# --- the scenarios -------------------------------------------------------------------------------
def hostile_input(run: ScenarioRun) -> None:
    """Every hostile kind, several times, interleaved with valid events at a steady rate; then a
    trainer run over a window that holds all of them."""
    p = run.params
    run.start()
    kinds = list(hostile.KINDS) * p.hostile_rounds
    random.Random(5).shuffle(kinds)
    run.traffic.steady(p.rate, p.hostile_s, kinds)
    run.drain(quiet=True)
    trainer = run.train("trainer-after-hostile")
    run.note(f"`trainer once` over a window holding every hostile kind: {_trainer_outcome(trainer)}")


def consumer_kill(run: ScenarioRun) -> None:
    """SIGKILL the consumer three times while events flow; restarted at once each time, the next
    kill once outputs flow again."""
    p = run.params
    run.start()
    assert run.pool is not None
    producer = run.traffic.steady_in_background(p.rate, 3600)
    for _ in range(3):
        time.sleep(p.kill_gap_s)
        killed_at = time.time()
        run.pool.kill(0)
        time.sleep(0.5)
        restarted = run.pool.restart(0)
        run.fault("consumer SIGKILL", killed_at, restarted.started_at)
        run.result.kills += 1
        run.wait_for_output(restarted.started_at, 90)
    time.sleep(p.kill_gap_s)
    run.traffic.stop.set()
    producer.join()


def broker_kill(run: ScenarioRun) -> None:
    """SIGKILL the broker while events flow; start it again on the same data dir."""
    p = run.params
    run.start()
    producer = run.traffic.steady_in_background(p.rate, p.broker_s)
    time.sleep(p.broker_s * 0.3)
    killed_at = time.time()
    run.stack.kill("kafka")
    time.sleep(p.broker_down_s)
    run.stack.start("kafka")
    run.fault("broker SIGKILL", killed_at, time.time())
    run.result.kills += 1
    run.note(f"broker down {time.time() - killed_at:.1f} s (SIGKILL, restart on the same data dir, "
             f"until it accepted connections)")
    producer.join()


def redis_outage(run: ScenarioRun) -> None:
    """SIGKILL Redis while events flow, keep it down ~10 s, start it again on its data; then
    train once and check that the consumers take the new model."""
    _redis_down(run, lose_data=False)


def redis_lost(run: ScenarioRun) -> None:
    """As ``redis_outage``, but Redis comes back empty (its data dir wiped): the registry must
    be rebuilt from the models topic and the next version must follow the last one."""
    _redis_down(run, lose_data=True)


def _redis_down(run: ScenarioRun, lose_data: bool) -> None:
    p = run.params
    run.start()
    before = run.versions_since(0)
    producer = run.traffic.steady_in_background(p.rate, 3600)
    time.sleep(p.redis_s * 0.25)
    killed_at = time.time()
    run.stack.kill("redis")
    time.sleep(p.redis_down_s)
    if lose_data:
        run.stack.wipe("redis")
    run.stack.start("redis")
    run.fault("Redis SIGKILL" + (", restarted empty" if lose_data else ""), killed_at, time.time())
    run.result.kills += 1
    kept = run.model_store().current_version()
    time.sleep(max(p.redis_s * 0.75 - p.redis_down_s, 1.0))
    trainer = run.train("trainer-after-outage")
    published_at = time.time()
    time.sleep(6.0)
    run.traffic.stop.set()
    producer.join()
    run.drain(quiet=True)
    run.note(f"Redis down {run.result.faults[-1].end - killed_at:.1f} s; after its restart the "
             f"model pointer was {'v' + str(kept) if kept is not None else 'gone (Redis restarted empty)'}. "
             f"Versions scored before the outage: {dict(before)}; `trainer once` after it: "
             f"{_trainer_outcome(trainer)}; versions of outputs from 3 s after that publish: "
             f"{dict(run.versions_since(published_at + 3.0))}")


def rebalance_storm(run: ScenarioRun) -> None:
    """Three replicas; every ``storm_every_s`` one is stopped (SIGTERM) and started again. At the
    end, once drained, all three are stopped at once (a scale-down to zero)."""
    p = run.params
    run.start(replicas=3)
    assert run.pool is not None
    producer = run.traffic.steady_in_background(p.storm_rate, p.storm_s)
    slot = 0
    time.sleep(p.storm_every_s)
    while producer.is_alive():
        stopped_at = time.time()
        rc = run.pool.stop(slot)
        if rc != 0:
            run.note(f"replica {slot} exited {rc} on SIGTERM during the storm")
        restarted = run.pool.restart(slot)
        run.fault("replica stop/start", stopped_at, restarted.started_at)
        run.result.kills += 1
        slot = (slot + 1) % 3
        producer.join(p.storm_every_s)
    run.drain(quiet=True)
    for proc in run.pool.slots:  # its signal handlers are in place once it logs this
        proc.wait_for_log("consumer starting", 30)
    time.sleep(3.0)
    began = time.monotonic()
    procs = run.pool.stop_all_at_once()
    codes = [proc.returncode for proc in procs]
    for proc in procs:
        proc.expected = proc.returncode != 0 and not proc.hung
    if any(codes):
        run.result.expected_exits.append(f"all 3 stopped at once: exits {codes}")
    why = " (143: the consumer's own bound, SEG_SHUTDOWN_TIMEOUT_S=10 s, cut its stop short)"
    why = why if any(codes) else ""
    run.note(f"all three replicas sent SIGTERM at once after the storm: exits {codes} within "
             f"{time.monotonic() - began:.1f} s{why}")


def kill_storm(run: ScenarioRun) -> None:
    """Exactly-once change chains under churn: three replicas; every ``storm_every_s`` one is SIGKILLed or
    SIGTERMed in turn and restarted a second later, and the broker is SIGKILLed once midway. A
    member killed mid-transaction leaves it open (until its restart fences it, or it times out),
    so this is where a rebuild of the change state meets an open transaction."""
    p = run.params
    run.start(replicas=3)
    assert run.pool is not None
    producer = run.traffic.steady_in_background(p.storm_rate, p.storm_s)
    slot, stops, broker_done = 0, 0, False
    time.sleep(p.storm_every_s)
    while producer.is_alive():
        stopped_at = time.time()
        if stops % 2 == 0:
            run.pool.kill(slot)
            what = "replica SIGKILL/start"
        else:
            if run.pool.stop(slot) != 0:
                run.note(f"replica {slot} exited non-zero on SIGTERM during the storm")
            what = "replica SIGTERM/start"
        time.sleep(1.0)
        restarted = run.pool.restart(slot)
        run.fault(what, stopped_at, restarted.started_at)
        run.result.kills += 1
        stops += 1
        slot = (slot + 1) % 3
        if not broker_done and stops == 3:
            killed_at = time.time()
            run.stack.kill("kafka")
            time.sleep(p.broker_down_s)
            run.stack.start("kafka")
            run.fault("broker SIGKILL", killed_at, time.time())
            run.result.kills += 1
            broker_done = True
        producer.join(p.storm_every_s)
    run.drain(quiet=True)


def poisoned_readback(run: ScenarioRun) -> None:
    """Hostile records on the changes and models topics and under every Redis key read back
    (``chaos.poison``), written while events flow and a `trainer run` polls; then both replicas
    restart (SIGKILL, SIGTERM), so they rebuild their change state from the poisoned topic and
    load the model past the poisoned pointer; a `trainer once --force` must publish and the
    consumers take its model; `trainer show`, `history` and `report` must answer."""
    p = run.params
    run.start(replicas=2)
    assert run.pool is not None
    trainer = run.procs.start("trainer-run", ["trainer", "run"],
                              extra_env={"SEG_MIN_ROWS": "1000000000"})
    producer = run.traffic.steady_in_background(p.rate, 3600)
    time.sleep(p.kill_gap_s)
    victims = [c.customer_id for c in run.traffic.customers[:20]]
    poisoned_at = time.time()
    written = (poison.poison_changes_topic(run.settings, victims, segment_id=0)
               + poison.poison_models_topic(run.settings)
               + len(poison.poison_redis(run.settings, victims)))
    run.fault("poisoned topics and Redis keys", poisoned_at, time.time())
    for slot, how in ((0, "SIGKILL"), (1, "SIGTERM")):
        time.sleep(p.kill_gap_s)
        stopped_at = time.time()
        if how == "SIGKILL":
            run.pool.kill(slot)
        elif run.pool.stop(slot) != 0:
            run.note(f"replica {slot} exited non-zero on SIGTERM")
        restarted = run.pool.restart(slot)
        run.fault(f"replica {how}/start onto the poison", stopped_at, restarted.started_at)
        run.result.kills += 1
        run.wait_for_output(restarted.started_at, 90)
    forced = run.train("trainer-after-poison", "--force")
    published_at = time.time()
    time.sleep(6.0)
    answers = {name: run.procs.run(f"trainer-{name}", ["trainer", *args], timeout_s=60).returncode
               for name, args in (("show", ["show", "--json"]), ("history", ["history", "--json"]),
                                  ("report", ["report", "--out", str(run.procs.log_dir / "report")]))}
    run.traffic.stop.set()
    producer.join()
    run.drain(quiet=True)
    alive = "still running" if trainer.poll() is None else f"EXITED {trainer.returncode}"
    run.note(f"{written} hostile records and keys written; `trainer run` {alive}; `trainer once --force` "
             f"after them: {_trainer_outcome(forced)}; show / history / report exits: {answers}; versions "
             f"of outputs from 3 s after that publish: {dict(run.versions_since(published_at + 3.0))}")


def _kill_on_change(run: ScenarioRun, proc: Proc, read: Callable[[], object], timeout_s: float = 60) -> bool:
    """SIGKILL ``proc`` the moment ``read()`` answers something else than it did at first."""
    before = read()
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < deadline:
        if read() != before:
            run.procs.kill(proc)
            return True
        time.sleep(0.001)
    return False


def _kill_mid_publish(run: ScenarioRun, proc: Proc, step: str) -> bool:
    """Kill a trainer inside its publish: once it allocated its version (``version_seq`` in
    Redis), or once it wrote the models topic (its high watermark moved) before or while it
    switches the Redis pointer."""
    if step == "version":
        client = connect(run.settings)
        key = f"{run.settings.redis_prefix}:version_seq"
        return _kill_on_change(run, proc, lambda: client.get(key))
    probe = Consumer({**run.settings.kafka_common(), "group.id": f"chaos-probe-{uuid.uuid4().hex}"})
    tp = TopicPartition(run.settings.models_topic, 0)
    try:
        return _kill_on_change(run, proc, lambda: probe.get_watermark_offsets(tp, 5, cached=False)[1])
    finally:
        probe.close()


def _registry_state(run: ScenarioRun) -> str:
    """The current version in Redis and in the models topic (the record of truth)."""
    store = run.model_store()
    text = f"Redis v{store.current_version()} of {store.versions()}"
    try:
        from segmentation.model_log import read_registry

        text += f", models topic v{read_registry(run.settings).current}"
    except Exception as exc:  # noqa: BLE001 - informative only
        text += f", models topic not read ({type(exc).__name__})"
    return text


def trainer_kill(run: ScenarioRun) -> None:
    """``trainer once --force`` SIGKILLed several times while consumers score, in turn: during its
    fit (some time after its window read), the moment it allocates its version, and the moment its
    models-topic write lands (before or while it switches the Redis pointer); then a normal run
    must publish and the consumers take its model."""
    p = run.params
    run.start()
    producer = run.traffic.steady_in_background(p.rate, 3600)
    rng = random.Random(17)
    kills = []
    for i in range(p.trainer_kills):
        proc = run.procs.start("trainer-killed", ["trainer", "once", "--force"], normal_exits=TRAINER_NORMAL)
        if i % 3:
            step = "version" if i % 3 == 1 else "models topic"
            killed = _kill_mid_publish(run, proc, step)
            where = "at its version allocation" if step == "version" else "after its models-topic write"
        else:
            read = proc.wait_for_log("window read", 60)
            delay = rng.uniform(0.0, 0.5)
            time.sleep(delay)
            where = f"{delay:.2f} s after its window read" if read else "(no 'window read' logged)"
            killed = proc.poll() is None
            if killed:
                run.procs.kill(proc)
        if killed:
            run.fault("trainer SIGKILL", time.time(), time.time())
            run.result.kills += 1
            kills.append(f"{where} (last log: {_last_log(proc)}) -> {_registry_state(run)}")
        else:
            kills.append(f"none {where}: it had ended ({_trainer_outcome(proc)})")
        time.sleep(run.settings.lock_ttl_s + 0.5)  # a killed trainer's lease must expire first
    show = run.procs.run("trainer-show", ["trainer", "show", "--json"], timeout_s=60)
    final = run.train("trainer-final")
    published_at = time.time()
    time.sleep(6.0)
    run.traffic.stop.set()
    producer.join()
    run.drain(quiet=True)
    run.note(f"SIGKILLs: {'; '.join(kills)}. Then `trainer show` exit {show.returncode} (0: the "
             f"current bundle loads and validates); a normal `trainer once`: {_trainer_outcome(final)} "
             f"-> {_registry_state(run)}; versions of outputs from 3 s after it: "
             f"{dict(run.versions_since(published_at + 3.0))}")


def permanent_error(run: ScenarioRun) -> None:
    """The output topic is deleted while the consumer runs (the broker does not auto-create):
    the consumer should exit non-zero with one clear line; after the topic is created again and
    the consumer restarted, the events it did not commit are scored."""
    p = run.params
    run.start(auto_restart=False)
    assert run.pool is not None
    run.traffic.steady(p.rate, p.permanent_s)
    run.drain(quiet=True)
    deleted_at = time.time()
    delete_topics(run.settings, [run.settings.segments_topic])
    producer = run.traffic.steady_in_background(p.rate, p.exit_wait_s)
    proc = run.pool.wait_exit(0, p.exit_wait_s)
    run.traffic.stop.set()
    producer.join()
    if proc is None:
        run.note(f"the consumer did NOT exit within {p.exit_wait_s:.0f} s of the output topic's deletion")
        rc = run.pool.stop(0)
        run.note(f"then SIGTERM: exit {rc}")
    else:
        run.pool.held.add(0)
        proc.expected = proc.returncode != 0
        line = f"exit {proc.returncode} {(proc.ended_at or deleted_at) - deleted_at:.1f} s after the deletion"
        (run.result.expected_exits if proc.expected else run.result.unexpected_exits).append(line)
        errors = proc.error_lines(6)
        run.note(f"consumer {line}; {proc.tracebacks()} traceback(s); its error lines: "
                 + (" / ".join(f"`{e}`" for e in errors) or "none"))
    ensure_topics(run.settings)
    run.collector.reset(run.settings.segments_topic)
    restarted = run.pool.restart(0)
    run.fault("output topic deleted", deleted_at, restarted.started_at)
    run.traffic.stop.clear()
    run.traffic.steady(p.rate, p.permanent_s)


@dataclass(frozen=True)
class Scenario:
    name: str
    run: Callable[[ScenarioRun], None]
    modes: tuple[str, ...]
    what: str
    overrides: tuple[tuple[str, Any], ...] = ()


SCENARIOS = (
    Scenario("hostile", hostile_input, MODES,
             "every hostile kind (see chaos/hostile.py) interleaved with valid events"),
    Scenario("consumer-kill", consumer_kill, MODES, "consumer SIGKILL x3, restarted at once"),
    Scenario("broker-kill", broker_kill, MODES, "broker SIGKILL, restarted on the same data"),
    Scenario("redis-outage", redis_outage, MODES,
             "Redis SIGKILL, ~10 s down, restarted on its data dir; then `trainer once`"),
    Scenario("redis-lost", redis_lost, MODES,
             "Redis SIGKILL, ~10 s down, restarted EMPTY (data dir wiped); then `trainer once`"),
    Scenario("rebalance-storm", rebalance_storm, MODES,
             "3 replicas, one stopped (SIGTERM) and restarted every ~6 s"),
    Scenario("kill-storm", kill_storm, MODES,
             "3 replicas, one SIGKILLed or SIGTERMed in turn and restarted every ~6 s; the broker "
             "SIGKILLed once"),
    Scenario("poisoned", poisoned_readback, MODES,
             "hostile records on the changes and models topics and under every Redis key read back, "
             "while `trainer run` polls; both replicas restarted onto them; then `trainer once --force`"),
    Scenario("trainer-kill", trainer_kill, ("at-least-once",),
             "`trainer once --force` SIGKILLed during its fit or mid-publish, then a normal run",
             (("lock_ttl_s", 3),)),
    Scenario("permanent-error", permanent_error, MODES,
             "output topic deleted while running; recreated, consumer restarted"),
)


def run_scenario(scenario: Scenario, mode: str, stack: PrivateStack, params: Params,
                 log_dir: Path) -> ScenarioResult:
    stack.ensure_up()
    run = ScenarioRun(scenario.name, mode, stack, params, log_dir, **dict(scenario.overrides))
    try:
        scenario.run(run)
    except Exception as exc:  # noqa: BLE001 - reported in the table, the next scenario still runs
        run.result.failed = f"{type(exc).__name__}: {exc}"
    return run.finish()
