"""The Docker image builds from exactly the files its Dockerfile copies (no Docker engine here:
the same copy, then the same package build, in a temporary directory)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.system  # builds the package from the Dockerfile's files: make system, not make test

ROOT = Path(__file__).resolve().parent.parent


def copied_paths(dockerfile: Path) -> list[str]:
    """Sources of every ``COPY`` line (without flags and the destination)."""
    sources: list[str] = []
    for line in dockerfile.read_text().splitlines():
        parts = line.split()
        if parts and parts[0] == "COPY":
            sources += [p for p in parts[1:-1] if not p.startswith("--")]
    return sources


def test_the_package_builds_from_exactly_the_files_the_dockerfile_copies(tmp_path: Path) -> None:
    context = tmp_path / "context"
    context.mkdir()
    for source in copied_paths(ROOT / "Dockerfile"):
        origin = ROOT / source
        if origin.is_dir():
            shutil.copytree(origin, context / source, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(origin, context / source)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
         "-w", str(tmp_path / "wheel"), str(context)],
        capture_output=True, text=True, timeout=300,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    assert list((tmp_path / "wheel").glob("streaming_segmentation-*.whl"))
