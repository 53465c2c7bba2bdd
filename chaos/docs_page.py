"""``docs/reliability.md``: intro, the table (one row per scenario and delivery mode), notes."""

from __future__ import annotations

import platform
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from chaos import hostile
from chaos.measure import ScenarioResult
from chaos.procs import ROOT
from chaos.scenarios import SCENARIOS, Params

MODE_SHORT = {"at-least-once": "at-least-once", "exactly-once": "exactly-once"}


@dataclass(frozen=True)
class RunInfo:
    started_utc: str
    seconds: float
    quick: bool
    params: Params
    log_dir: Path


# The broker-free test of each scenario's ordering (kept in Markdown: it is a table).
FAST_TWINS = Path(__file__).with_name("fast_twins.md")


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
    return done.stdout.strip()


def machine() -> str:
    nproc = subprocess.run(["nproc"], capture_output=True, text=True, check=False).stdout.strip()
    uname = subprocess.run(["uname", "-srm"], capture_output=True, text=True, check=False).stdout.strip()
    return f"`{uname}`, {nproc} cores (`nproc`), Python {platform.python_version()}"


def source_state() -> str:
    head = _git("rev-parse", "--short", "HEAD") or "?"
    dirty = [line[3:] for line in _git("status", "--porcelain").splitlines()
             if line[3:].startswith(("segmentation/", "consumer/", "trainer/"))]
    if not dirty:
        return f"commit `{head}`, no local changes in segmentation/, consumer/, trainer/"
    return (f"commit `{head}` **plus uncommitted changes** in {', '.join(f'`{d}`' for d in dirty)} "
            f"(the working tree as it was during the run)")


def _reasons(c: Counter[str]) -> str:
    return ", ".join(f"{r} {n}" for r, n in c.most_common()) or "none"


def _lost(r: ScenarioResult) -> str:
    text = f"{r.lost_valid} / {r.lost_hostile}"
    if r.hostile_scored:
        text += f" ({r.hostile_scored} scored instead)"
    if r.stalled:
        text += f"; **{r.stalled} stalled**"
    return text


def _duplicated(r: ScenarioResult) -> str:
    text = str(r.duplicated)
    if r.duplicate_copies > r.duplicated:
        text += f" ({r.duplicate_copies} extra copies)"
    if r.dead_letter_duplicates:
        text += f"; {r.dead_letter_duplicates} dead-lettered twice"
    return text


def _changes(r: ScenarioResult) -> str:
    broken = f"**{r.changes_broken} broken**" if r.changes_broken else "0 broken"
    return f"{r.changes} ({broken}, {r.change_repeats} repeated)"


def _exits(r: ScenarioResult) -> str:
    parts = [f"{len(r.unexpected_exits)} / {len(r.trainer_exits)}"]
    if r.tracebacks:
        parts.append(f"{r.tracebacks} tracebacks")
    if r.expected_exits:
        parts.append(f"expected: {'; '.join(r.expected_exits)}")
    return ", ".join(parts)


def _recovery(r: ScenarioResult) -> str:
    if not r.faults:
        return "n/a"
    first = f"{r.first_output_s:.1f}" if r.first_output_s is not None else "none"
    caught = "NEVER" if r.never_caught_up else (f"{r.caught_up_s:.1f}" if r.caught_up_s is not None else "?")
    return f"{first} / {caught}"


def table(results: list[ScenarioResult]) -> list[str]:
    lines = [
        "| scenario | mode | events valid / hostile | lost valid / hostile | duplicated | "
        "dead-lettered by reason | segment changes (broken, repeated) | exits consumer / trainer | "
        "recovery s (first output / caught up) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.failed:
            lines.append(f"| {r.scenario} | {r.mode} | {r.valid} / {r.hostile} | harness failed: "
                         f"{r.failed[:160]} | | | | {_exits(r)} | |")
            continue
        lines.append(
            f"| {r.scenario} | {r.mode} | {r.valid} / {r.hostile} | {_lost(r)} | {_duplicated(r)} | "
            f"{_reasons(r.dead_letters)} | {_changes(r)} | {_exits(r)} | {_recovery(r)} |"
        )
    return lines


def hostile_table(results: list[ScenarioResult]) -> list[str]:
    rows = [r for r in results if r.scenario == "hostile" and r.hostile_outcomes]
    if not rows:
        return []
    lines = ["| hostile kind | " + " | ".join(r.mode for r in rows) + " |",
             "|---|" + "---|" * len(rows)]
    for kind in hostile.KINDS:
        cells = [_reasons(r.hostile_outcomes.get(kind, Counter())) for r in rows]
        lines.append(f"| `{kind}` | " + " | ".join(cells) + " |")
    return lines


def notes(results: list[ScenarioResult]) -> list[str]:
    lines: list[str] = []
    for r in results:
        items = list(r.notes)
        if r.failed:
            items.insert(0, f"**the harness could not complete this scenario**: {r.failed}")
        if r.valid_dead_lettered:
            items.append(f"{r.valid_dead_lettered} valid events were dead-lettered")
        if r.unattributed_dead_letters:
            items.append(f"{r.unattributed_dead_letters} dead letters without source headers")
        if r.unexpected_exits:
            items.append("unexpected consumer exits: " + "; ".join(r.unexpected_exits))
        if r.trainer_exits:
            items.append("unexpected trainer exits: " + "; ".join(r.trainer_exits))
        errors = list(dict.fromkeys(r.error_lines))  # unique, in order
        if errors:
            items.append("stderr: " + " / ".join(f"`{e[:300]}`" for e in errors[:6]))
        if r.model_versions:
            items.append("outputs by model version: "
                         + ", ".join(f"v{v} {n}" for v, n in sorted(r.model_versions.items())))
        items.append(f"took {r.duration_s:.0f} s")
        lines.append(f"* **{r.scenario}, {r.mode}**: " + "; ".join(items))
    return lines


def write(path: Path, results: list[ScenarioResult], info: RunInfo) -> None:
    p = info.params
    scenario_lines = [f"{i}. `{s.name}` ({', '.join(s.modes)}): {s.what}" for i, s in enumerate(SCENARIOS, 1)]
    text = [
        "# Reliability: the chaos table",
        "",
        "Generated by `make chaos` (`python -m chaos`); do not edit by hand.",
        "",
        "What: real consumer processes (`python -m consumer`) and trainers (`python -m trainer once`)",
        "on a **private** Kafka + Redis stack that the harness starts for itself (`scripts/stack.sh`",
        "with `STACK_DIR=.stack/chaos`, Kafka on 127.0.0.1:19092, Redis on 16379), so killing its",
        "broker disturbs no other stack. Each scenario and delivery mode gets its own topics, consumer",
        "group, Redis prefix, replica and transactional ids; produces one valid event per customer,",
        "publishes a first model with `trainer once`, then injects its fault while events flow. Every",
        "event has a unique `event_id`; at the end the output and dead-letter topics are read back",
        "with `isolation.level=read_committed` and every message produced is accounted for.",
        "",
        "How to run: `make chaos` (writes this file; about 20 minutes on 2 cores, longer when shared).",
        "`python -m chaos --quick` is a smoke run with fewer events, `--only NAME` runs one scenario",
        "(repeatable), `--mode` one delivery mode; these write `.stack/chaos/reliability-smoke.md`",
        "unless `--out` says otherwise. Process logs (one file per process):",
        f"`{info.log_dir.relative_to(ROOT) if info.log_dir.is_relative_to(ROOT) else info.log_dir}`.",
        "",
        f"This run: {info.started_utc}, {'**quick** ' if info.quick else ''}took {info.seconds / 60:.1f} "
        f"minutes, on {machine()}; {source_state()}.",
        "",
        "Scenarios:",
        "",
        *scenario_lines,
        "",
        f"Rates: {p.rate:.0f} valid events/s ({p.storm_rate:.0f}/s in the storm), {p.customers} customers;",
        f"hostile: every kind x {p.hostile_rounds}; consumer defaults otherwise (batch 500,",
        "commit interval 1 s, session timeout 10 s), `SEG_MODEL_POLL_S=1`, `SEG_N_INIT=4`.",
        "",
        "## Table",
        "",
        *table(results),
        "",
        "Columns:",
        "",
        "* **lost**: valid events with neither an output nor a dead letter / hostile messages without",
        "  a dead letter (a hostile message scored instead counts as lost and is shown in brackets).",
        "* **stalled**: messages still unhandled when nothing had moved for the drain's idle bound",
        f"  ({p.drain_idle_s:.0f} s). The harness then dumps the consumers' stacks (SIGABRT with",
        "  `PYTHONFAULTHANDLER=1`), restarts them and drains again; only what is missing after that",
        "  counts as lost. A stall is a failure of its own (the pipeline stops without help).",
        "* **duplicated**: event ids output more than once (at-least-once allows this for the",
        "  uncommitted window of each fault; exactly-once must show 0).",
        "* **segment changes**: records of the changes topic, an event's change repeated set aside",
        "  (one customer in ten switches profile on every other event, so changes flow through the",
        "  faults).",
        "  Per customer, the first must be `initial` and each next one must start from the segment",
        "  the one before ended in; a change that does not is **broken** (invented against a lost",
        "  state, or following a lost change). Repeats are allowed at-least-once; exactly-once must",
        "  show 0.",
        "* **exits consumer / trainer**: consumer processes that ended other than by a harness SIGKILL",
        "  or a harness SIGTERM answered with exit 0 (a stuck one counts) / trainer and CLI processes",
        "  that did so other than with one of their results (`trainer once`: 0 published, 2 refused,",
        "  3 skipped; `show`, `history`, `report`: 0); then the Python tracebacks in all their logs",
        "  (killed ones included); an exit the scenario provokes on purpose is listed as expected.",
        "* **recovery**, worst over the scenario's faults: seconds from the end of the fault (process",
        "  restarted, broker or Redis accepting connections again) to the first output after it / until",
        "  every message produced before the fault ended had its output or dead letter (the backlog",
        "  cleared: lag 0). NEVER: not without the harness's rescue. Times are the Kafka CreateTimes",
        "  of input and output records (one clock).",
        "",
        "## Hostile messages, outcome per kind",
        "",
        *hostile_table(results),
        "",
        *FAST_TWINS.read_text().rstrip().split("\n"),
        "",
        "## Notes",
        "",
        *notes(results),
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(text))
