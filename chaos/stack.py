"""The harness's private Kafka + Redis (``scripts/stack.sh`` on other ports and another
``STACK_DIR``), so that killing its broker disturbs nobody else's stack."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from chaos.procs import ROOT, kill_pid, run_command

SHARED_LIBS = ROOT / ".stack" / "kafka" / "libs"


@dataclass(frozen=True)
class PrivateStack:
    stack_dir: Path = ROOT / ".stack" / "chaos"
    kafka_port: int = 19092
    controller_port: int = 19093
    redis_port: int = 16379

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def _env(self) -> dict[str, str]:
        return {
            **os.environ, "STACK_DIR": str(self.stack_dir), "KAFKA_PORT": str(self.kafka_port),
            "KAFKA_CONTROLLER_PORT": str(self.controller_port), "REDIS_PORT": str(self.redis_port),
        }

    def _script(self, command: str) -> str:
        return run_command(["bash", "scripts/stack.sh", command], self._env())

    def fresh_up(self) -> None:
        """Stop what a previous run left (only this stack's own pidfiles), wipe its data, start."""
        self.down()
        for sub in ("kafka/data", "kafka/cluster.id", "kafka/logs", "redis"):
            path = self.stack_dir / sub
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        libs = self.stack_dir / "kafka" / "libs"
        if not libs.exists() and SHARED_LIBS.is_dir():  # reuse the jars, never download twice
            shutil.copytree(SHARED_LIBS, libs)
        self._script("up")
        for name in ("kafka", "redis"):
            if self._pid(name) is None:
                raise RuntimeError(f"{name} on the chaos ports was not started by this harness "
                                   f"(another process answers there); refusing to kill it")

    def ensure_up(self) -> None:
        """Idempotent: start whatever of this stack is not answering (after a failed restart)."""
        self._script("up")

    def down(self) -> None:
        self._script("down")

    def _pid(self, name: str) -> int | None:
        path = self.stack_dir / f"{name}.pid"
        try:
            return int(path.read_text().strip())
        except (OSError, ValueError):
            return None

    def kill(self, name: str) -> None:
        """SIGKILL the broker (``kafka``) or Redis (``redis``) of this stack."""
        pid = self._pid(name)
        if pid is None:
            raise RuntimeError(f"no pidfile for {name} in {self.stack_dir}")
        kill_pid(pid)

    def wipe(self, name: str) -> None:
        """Delete the data of a stopped ``redis`` (what a restart without persistence loses)."""
        path = self.stack_dir / name
        if path.is_dir():
            for child in path.iterdir():
                if child.name != "redis.log":
                    shutil.rmtree(child) if child.is_dir() else child.unlink()

    def start(self, name: str) -> None:
        """Start ``kafka`` (on the same data dir) or ``redis`` again; returns once it answers."""
        self._script(f"{name}-start")
