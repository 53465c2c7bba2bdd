"""A real Prometheus (Debian's, started by ``scripts/stack.sh``), the project's processes it
scrapes, and the monitoring files under test."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.parse
import urllib.request
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest
import yaml

from segmentation.settings import Settings
from tests.support.stack import free_port, settings_env

ROOT = Path(__file__).resolve().parent.parent.parent
MONITORING = ROOT / "monitoring"
ALERTS = MONITORING / "alerts.yml"
ALERT_TESTS = MONITORING / "alerts_test.yml"
PROM_LOCAL = MONITORING / "prometheus.yml"
INSTALL_HINT = "run `bash scripts/install-system.sh` (Debian packages prometheus, docker-compose)"


def need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.fail(f"`{binary}` not found on PATH: {INSTALL_HINT}")
    return path


def run(
    args: list[str], cwd: Path = ROOT, timeout: float = 60, **kw: Any
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, **kw)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def alert_rules() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for g in load_yaml(ALERTS)["groups"] for r in g["rules"] if "alert" in r}


class Prometheus:
    """Debian's prometheus started and stopped by scripts/stack.sh; queries over the HTTP API."""

    def __init__(self, config: Path, port: int, stack_dir: Path) -> None:
        self.config = config
        self.port = port
        self.env = {**os.environ, "PROM_PORT": str(port), "STACK_DIR": str(stack_dir),
                    "PROM_READY_TIMEOUT": "30"}
        self.pidfile = stack_dir / "prometheus.pid"

    def start(self) -> None:
        result = run(["bash", "scripts/stack.sh", "prometheus-up", str(self.config)], env=self.env)
        assert result.returncode == 0, result.stdout + result.stderr

    def stop(self) -> None:
        result = run(["bash", "scripts/stack.sh", "prometheus-down"], env=self.env)
        if self.pidfile.exists():  # the script failed to stop it: do it here, by pid
            pid = int(self.pidfile.read_text().strip() or 0)
            if pid:
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        assert result.returncode == 0, result.stdout + result.stderr

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.load(resp)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", (expr, data["resultType"])
        return data["result"]

    def scalar(self, expr: str) -> float:
        result = self.query(expr)
        assert len(result) == 1, (expr, result)
        return float(result[0]["value"][1])


class Process:
    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log = log_dir / f"{name}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace").splitlines()[-lines:]
        return f"--- {self.name} (exit {self.proc.poll()}) {self.log}\n" + "\n".join(text)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def local_prometheus(directory: Path, ports: dict[str, int]) -> Prometheus:
    """A Prometheus on a free port that scrapes the ``consumer`` and ``trainer`` jobs at
    ``ports`` every second, with the project's alert rules evaluated every second (not started)."""
    config = load_yaml(PROM_LOCAL)
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(ALERTS)]
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [f"127.0.0.1:{ports[job['job_name']]}"]}]
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
    return Prometheus(directory / "prometheus.yml", free_port(), directory / "stack")


def start_trainer_and_consumer(
    processes: list[Process], settings: Settings, ports: dict[str, int], log_dir: Path
) -> None:
    """``python -m trainer run`` and ``python -m consumer`` serving metrics on ``ports``; each is
    appended to ``processes`` as soon as it starts, so that the caller stops what did start."""
    for name, args in (("trainer", ["-m", "trainer", "run"]), ("consumer", ["-m", "consumer"])):
        env = settings_env(settings, SEG_METRICS_PORT=str(ports[name]), SEG_REPLICA_ID=f"{name}-0")
        processes.append(Process(name, args, env, log_dir))


def tails(processes: list[Process]) -> str:
    """The last lines of every process' log, for an assertion message."""
    return "\n".join(p.tail() for p in processes)
