"""From what was sent, what a subscriber saw, the faults injected and the processes' fates to one
``ScenarioResult``: lost, duplicated, dead-lettered by reason, exits, recovery."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from chaos.procs import Proc
from chaos.traffic import Observed, Sent


@dataclass(frozen=True)
class Fault:
    """A fault the harness injected: from ``start`` until it ended (``end``, epoch seconds)."""

    what: str
    start: float
    end: float


@dataclass
class ScenarioResult:
    scenario: str
    mode: str
    valid: int = 0
    hostile: int = 0
    produce_failed: int = 0
    stalled: int = 0  # messages still unhandled when the drain gave up, before the harness's rescue
    lost_valid: int = 0
    lost_hostile: int = 0
    hostile_scored: int = 0  # hostile messages that got an output instead of a dead letter
    valid_dead_lettered: int = 0
    duplicated: int = 0  # event ids output more than once
    duplicate_copies: int = 0  # extra output copies in all
    dead_letter_duplicates: int = 0  # source offsets dead-lettered more than once
    dead_letters: Counter[str] = field(default_factory=Counter)
    unattributed_dead_letters: int = 0
    faults: list[Fault] = field(default_factory=list)
    kills: int = 0  # SIGKILLs / stops the harness caused (consumers, trainers, broker, Redis)
    unexpected_exits: list[str] = field(default_factory=list)  # consumers
    trainer_exits: list[str] = field(default_factory=list)  # unexpected, of trainers and the CLI
    expected_exits: list[str] = field(default_factory=list)
    tracebacks: int = 0
    first_output_s: float | None = None  # worst over faults: fault end -> first output after it
    caught_up_s: float | None = None  # worst over faults: fault end -> backlog produced before it done
    never_caught_up: bool = False
    hostile_outcomes: dict[str, Counter[str]] = field(default_factory=dict)
    model_versions: Counter[int] = field(default_factory=Counter)
    changes: int = 0  # segment changes, repeats set aside
    changes_broken: int = 0  # changes that do not continue their customer's chain (invented or lost)
    change_repeats: int = 0  # the same event's change again (at-least-once replays)
    duration_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    error_lines: list[str] = field(default_factory=list)
    failed: str | None = None  # the harness itself could not complete the scenario


def handled_at(s: Sent, obs: Observed, cutoff: float | None = None) -> float | None:
    """When ``s`` first got an output or a dead letter (None: never, or only after ``cutoff``)."""
    times = [t for t, _ in obs.outputs.get(s.event_id, [])]
    times += [t for t, _ in obs.dead.get((s.partition, s.offset), [])]
    first = min(times) if times else None
    return None if first is None or (cutoff is not None and first > cutoff) else first


def count_delivery(result: ScenarioResult, sent: list[Sent], obs: Observed) -> None:
    """Lost, duplicated, dead letters by reason, hostile outcomes per kind."""
    for s in sent:
        outputs = obs.outputs.get(s.event_id, [])
        dead = obs.dead.get((s.partition, s.offset), [])
        if len(dead) > 1:
            result.dead_letter_duplicates += 1
        if len(outputs) > 1:
            result.duplicated += 1
            result.duplicate_copies += len(outputs) - 1
        for _, version in outputs:
            result.model_versions[version] += 1
        if dead:
            result.dead_letters[dead[0][1]] += 1
        if s.kind == "valid":
            result.valid += 1
            result.lost_valid += not outputs and not dead
            result.valid_dead_lettered += bool(dead) and not outputs
            continue
        result.hostile += 1
        outcome = dead[0][1] if dead else ("SCORED (no dead letter)" if outputs else "LOST")
        result.hostile_outcomes.setdefault(s.kind, Counter())[outcome] += 1
        result.lost_hostile += not dead
        result.hostile_scored += bool(outputs) and not dead
    result.unattributed_dead_letters = sum(obs.dead_unattributed.values())


def count_changes(result: ScenarioResult, obs: Observed) -> None:
    """Each customer's segment changes, in topic order, repeats of an event's change set aside:
    the first must be ``initial`` and every other one must start where the one before ended. A
    change that does not is broken: invented against a lost state, or following a lost one.

    >>> r = ScenarioResult("s", "m")
    >>> count_changes(r, Observed(changes={"c": [("e1", None, 1, "initial"), ("e2", 1, 2, "behaviour"),
    ...                                          ("e2", 1, 2, "behaviour"), ("e3", None, 2, "initial")]}))
    >>> r.changes, r.change_repeats, r.changes_broken
    (3, 1, 1)
    """
    for rows in obs.changes.values():
        seen: set[str] = set()
        last: int | None = None
        for event_id, before, after, cause in rows:
            if event_id in seen:
                result.change_repeats += 1
                continue
            seen.add(event_id)
            result.changes += 1
            continues = cause == "initial" if last is None else (cause != "initial" and before == last)
            result.changes_broken += not continues
            last = after


def count_recovery(result: ScenarioResult, sent: list[Sent], obs: Observed, cutoff: float | None) -> None:
    """Per fault: seconds from its end to the first output after it, and to the moment every
    message produced before its end was handled (the backlog cleared, i.e. lag 0). Worst of all.
    What happened only after ``cutoff`` (the harness's rescue restart) does not count."""
    if not result.faults:
        return
    output_times = sorted(t for rows in obs.outputs.values() for t, _ in rows
                          if cutoff is None or t <= cutoff)
    firsts, catch_ups = [], []
    for fault in result.faults:
        first = next((t for t in output_times if t >= fault.end), None)
        if first is not None:
            firsts.append(first - fault.end)
        backlog = [handled_at(s, obs, cutoff) for s in sent if s.at <= fault.end]
        if any(t is None for t in backlog):
            result.never_caught_up = True
            continue
        done = max((t for t in backlog if t is not None), default=fault.end)
        catch_ups.append(max(done - fault.end, 0.0))
    result.first_output_s = max(firsts) if firsts else None
    result.caught_up_s = max(catch_ups) if catch_ups else None


def count_processes(result: ScenarioResult, procs: list[Proc], role: str = "consumer") -> None:
    """Unexpected exits (not caused by the harness, not a one-shot command's normal result) and
    tracebacks of one role's processes (``consumer`` or ``trainer``)."""
    exits = result.unexpected_exits if role == "consumer" else result.trainer_exits
    for p in procs:
        if not p.name.startswith(role):
            continue
        result.tracebacks += p.tracebacks()
        if p.unexpected_exit:
            hung = " (stuck: stacks dumped with SIGABRT, then killed)" if p.hung else ""
            exits.append(f"{p.name} pid {p.pid} exit {p.returncode}{hung}")
            result.error_lines += [f"{p.name}: {line}" for line in p.error_lines()]
        elif p.tracebacks():
            result.error_lines += [f"{p.name}: {line}" for line in p.error_lines()]
