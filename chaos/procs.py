"""Every process the harness starts, signals and reaps: consumers, trainers, ``scripts/stack.sh``.

Each child writes stdout and stderr to its own log file. Whether an exit was caused by the harness
(SIGKILL, or SIGTERM followed by exit 0) is recorded with it, so that unexpected exits and
tracebacks can be counted apart from the faults injected on purpose.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
TRACEBACK = "Traceback (most recent call last)"
STOP_BOUND_S = 20.0  # a graceful stop taking longer is a hang (the consumer bounds it at 10 s)
ERROR_LINE = re.compile(r"^\S+ (error|critical)\s", re.IGNORECASE)


@dataclass
class Proc:
    """One child process and what the harness did to it."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    started_at: float
    killed: bool = False  # SIGKILL sent by the harness
    stopped: bool = False  # SIGTERM sent by the harness
    expected: bool = False  # an exit the scenario provokes on purpose (a permanent error)
    hung: bool = False  # stuck (no progress, or no exit after SIGTERM): stacks dumped, then killed
    ended_at: float | None = None
    normal_exits: tuple[int, ...] = ()  # a one-shot command's results (`trainer once`: 0, 2, 3)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        rc = self.popen.poll()
        if rc is not None and self.ended_at is None:
            self.ended_at = time.time()
        return rc

    @property
    def returncode(self) -> int | None:
        return self.poll()

    @property
    def unexpected_exit(self) -> bool:
        """Ended, and not by a harness SIGKILL nor by a harness SIGTERM it obeyed with 0."""
        rc = self.poll()
        if self.hung:
            return True
        if rc is None or self.killed or self.expected or rc in self.normal_exits:
            return False
        return not (self.stopped and rc == 0)

    def wait_for_log(self, text: str, timeout_s: float) -> bool:
        """Wait until ``text`` appears in the log (False: timeout, or the process ended first)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if text in self.log_text():
                return True
            if self.poll() is not None:
                return False
            time.sleep(0.02)
        return False

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tracebacks(self) -> int:
        return self.log_text().count(TRACEBACK)

    def error_lines(self, limit: int = 5) -> list[str]:
        """Distinct problems in the log, most telling first: where a stuck process was, the last
        line of each traceback, the service's own error lines, then librdkafka's."""
        lines = self.log_text().splitlines()
        found = [f"{ln} in {_current_frame(lines, i)}"
                 for i, ln in enumerate(lines) if ln.startswith("Fatal Python error")]
        for i, ln in enumerate(lines):
            if ln.startswith(TRACEBACK):
                tail = next((x for x in lines[i + 1:] if x and not x.startswith((" ", "\t"))), "")
                found.append(f"traceback: {tail}")
        errors = [ln for ln in lines if ERROR_LINE.match(ln)]
        found += [ln for ln in errors if "librdkafka" not in ln] + [ln for ln in errors if "librdkafka" in ln]
        distinct = {_without_timestamp(ln)[:400]: None for ln in found}
        return list(distinct)[:limit]


@dataclass
class Procs:
    """The children of one scenario: started with one environment, logs in one directory."""

    env: dict[str, str]
    log_dir: Path
    all: list[Proc] = field(default_factory=list)
    _numbers: Iterator[int] = field(default_factory=lambda: itertools.count(1))  # thread-safe next()

    def start(self, name: str, args: list[str], extra_env: dict[str, str] | None = None,
              normal_exits: tuple[int, ...] = ()) -> Proc:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{next(self._numbers):03d}-{name}.log"
        with log_path.open("ab") as log_file:
            popen = subprocess.Popen(
                [PYTHON, "-m", *args], env={**self.env, "PYTHONFAULTHANDLER": "1", **(extra_env or {})},
                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc = Proc(name, popen, log_path, time.time(), normal_exits=normal_exits)
        self.all.append(proc)
        return proc

    def run(self, name: str, args: list[str], timeout_s: float,
            extra_env: dict[str, str] | None = None, normal_exits: tuple[int, ...] = (0,)) -> Proc:
        """Start and wait; after ``timeout_s`` it counts as hung (stacks dumped, killed)."""
        proc = self.start(name, args, extra_env, normal_exits)
        try:
            proc.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.abort(proc)
        proc.poll()
        return proc

    @staticmethod
    def kill(proc: Proc) -> None:
        """SIGKILL, and wait until it is gone."""
        if proc.poll() is None:
            proc.killed = True
            proc.popen.send_signal(signal.SIGKILL)
        proc.popen.wait()
        proc.poll()

    @staticmethod
    def stop(proc: Proc, timeout_s: float = STOP_BOUND_S) -> int:
        """SIGTERM (graceful); after ``timeout_s`` the process counts as hung: SIGABRT makes
        Python's faulthandler write every thread's stack to its log, then SIGKILL."""
        if proc.poll() is None:
            if not proc.stopped:  # a second SIGTERM would mean "exit at once" to a consumer
                proc.stopped = True
                proc.popen.send_signal(signal.SIGTERM)
            try:
                proc.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                Procs.abort(proc)
        proc.poll()
        return proc.popen.returncode

    @staticmethod
    def abort(proc: Proc) -> None:
        """A stuck process: SIGABRT makes Python's faulthandler write every thread's stack to its
        log (PYTHONFAULTHANDLER=1), then SIGKILL if it is still there."""
        if proc.poll() is not None:
            return
        proc.hung = True
        proc.popen.send_signal(signal.SIGABRT)
        try:
            proc.popen.wait(3)
        except subprocess.TimeoutExpired:
            proc.popen.kill()
            proc.popen.wait()
        proc.poll()

    def stop_all(self, at_once: bool = False, timeout_s: float = STOP_BOUND_S) -> list[Proc]:
        """Stop every running child: one after the other, or all signalled at once."""
        running = [p for p in self.all if p.poll() is None]
        if at_once:
            for p in running:
                p.stopped = True
                p.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for p in running:
            self.stop(p, max(deadline - time.monotonic(), 0.1) if at_once else timeout_s)
        return running


class ConsumerPool:
    """``n`` consumer replicas, each in a slot with its own replica id. A supervisor thread
    restarts a replica that exits by itself (``auto_restart``); kills and stops by the harness
    are followed by an explicit ``restart``."""

    def __init__(self, procs: Procs, n: int, auto_restart: bool = True, restart_delay_s: float = 1.0):
        self.procs = procs
        self.auto_restart = auto_restart
        self.restart_delay_s = restart_delay_s
        self.slots: list[Proc] = []
        self.held: set[int] = set()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        for i in range(n):
            self.slots.append(self._spawn(i))
        self._thread = threading.Thread(target=self._supervise, name="supervisor", daemon=True)
        self._thread.start()

    def _spawn(self, slot: int) -> Proc:
        return self.procs.start(f"consumer-{slot}", ["consumer"], {"SEG_REPLICA_ID": self.replica_id(slot)})

    def replica_id(self, slot: int) -> str:
        return f"{self.procs.env['SEG_REPLICA_ID']}-r{slot}"

    def _supervise(self) -> None:
        while not self.stopping.wait(0.2):
            for i in range(len(self.slots)):
                with self.lock:
                    proc = self.slots[i]
                    if i in self.held or proc.poll() is None or not self.auto_restart:
                        continue
                    died_at = proc.ended_at or time.time()
                if time.time() - died_at < self.restart_delay_s:
                    continue
                with self.lock:
                    if i not in self.held and self.slots[i] is proc:
                        self.slots[i] = self._spawn(i)

    def kill(self, slot: int) -> None:
        with self.lock:
            self.held.add(slot)
            proc = self.slots[slot]
        self.procs.kill(proc)

    def stop(self, slot: int, timeout_s: float = STOP_BOUND_S) -> int:
        with self.lock:
            self.held.add(slot)
            proc = self.slots[slot]
        return self.procs.stop(proc, timeout_s)

    def rescue(self) -> list[Proc]:
        """Abort (stacks dumped) every replica still running and start them all again."""
        with self.lock:
            self.held.update(range(len(self.slots)))
            stuck = [p for p in self.slots if p.poll() is None]
        for proc in stuck:
            self.procs.abort(proc)
        return [self.restart(i) for i in range(len(self.slots))]

    def restart(self, slot: int) -> Proc:
        """Start the slot again (after a kill, a stop or an exit); returns the new process."""
        with self.lock:
            self.slots[slot] = self._spawn(slot)
            self.held.discard(slot)
            return self.slots[slot]

    def wait_exit(self, slot: int, timeout_s: float) -> Proc | None:
        """The slot's process once it has exited by itself, or None after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                proc = self.slots[slot]
            if proc.poll() is not None:
                return proc
            time.sleep(0.2)
        return None

    def stop_all_at_once(self) -> list[Proc]:
        with self.lock:
            self.held.update(range(len(self.slots)))
        return self.procs.stop_all(at_once=True)

    def close(self) -> None:
        self.stopping.set()
        self._thread.join(5)
        self.procs.stop_all()


def run_command(args: list[str], env: dict[str, str], timeout_s: float = 180.0) -> str:
    """Run a command (``scripts/stack.sh``) to completion; its output, or RuntimeError."""
    done = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s,
                          stdin=subprocess.DEVNULL, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}")
    return done.stdout


def kill_pid(pid: int, timeout_s: float = 10.0) -> None:
    """SIGKILL a process the harness did not spawn itself (a stack daemon) and wait for it."""
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        if _zombie(pid):
            return
        time.sleep(0.05)
    raise TimeoutError(f"pid {pid} still alive {timeout_s}s after SIGKILL")


def _without_timestamp(line: str) -> str:
    """A log line without its leading timestamp (so repeats of one problem collapse).

    >>> _without_timestamp("2026-11-29T15:42:49 error   consumer: boom")
    'error   consumer: boom'
    """
    head, _, rest = line.partition(" ")
    return rest if head[:4].isdigit() and "T" in head else line


def _current_frame(lines: list[str], start: int) -> str:
    """The innermost frame of the signalled thread in a faulthandler dump starting at ``start``."""
    for i in range(start, len(lines) - 1):
        if lines[i].startswith("Current thread"):
            return lines[i + 1].strip()
    return "?"


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] in ("Z", "X")
    except (OSError, IndexError):
        return True
