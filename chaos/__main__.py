"""``python -m chaos [--quick] [--only NAME ...] [--out PATH]``: run the chaos scenarios on a
private stack and write the reliability table (``docs/reliability.md`` for a full run)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from chaos import docs_page
from chaos.measure import ScenarioResult
from chaos.procs import ROOT
from chaos.scenarios import FULL, QUICK, SCENARIOS, run_scenario
from chaos.stack import PrivateStack

FULL_REPORT = ROOT / "docs" / "reliability.md"
SMOKE_REPORT = ROOT / ".stack" / "chaos" / "reliability-smoke.md"


def parse(argv: list[str] | None) -> argparse.Namespace:
    names = [s.name for s in SCENARIOS]
    parser = argparse.ArgumentParser(prog="python -m chaos", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer events and shorter phases (smoke run)")
    parser.add_argument("--only", action="append", choices=names, metavar="NAME",
                        help=f"run only this scenario (repeatable): {', '.join(names)}")
    parser.add_argument("--mode", choices=("at-least-once", "exactly-once"),
                        help="run only this delivery mode")
    parser.add_argument("--out", type=Path, help=f"report path (default {FULL_REPORT.relative_to(ROOT)} "
                        f"for a full run, else {SMOKE_REPORT.relative_to(ROOT)})")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    for key in [k for k in os.environ if k.startswith("SEG_")]:
        del os.environ[key]  # the scenarios set every setting they depend on
    partial = bool(args.quick or args.only or args.mode)
    out: Path = args.out or (SMOKE_REPORT if partial else FULL_REPORT)
    params = QUICK if args.quick else FULL
    started_utc = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    stack = PrivateStack()
    log_root = stack.stack_dir / "logs" / stamp
    started = time.monotonic()
    results: list[ScenarioResult] = []
    log_root.mkdir(parents=True, exist_ok=True)  # the harness's own Kafka client logs go there
    logging.basicConfig(filename=log_root / "harness.log", level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(f"chaos: private stack in {stack.stack_dir} (Kafka {stack.bootstrap}, Redis {stack.redis_url})",
          flush=True)
    stack.fresh_up()
    try:
        for scenario in SCENARIOS:
            if args.only and scenario.name not in args.only:
                continue
            for mode in scenario.modes:
                if args.mode and mode != args.mode:
                    continue
                print(f"chaos: {scenario.name} ({mode}) ...", flush=True)
                result = run_scenario(scenario, mode, stack, params, log_root / f"{scenario.name}-{mode}")
                results.append(result)
                print("  " + docs_page.table([result])[-1], flush=True)
                info = docs_page.RunInfo(started_utc, time.monotonic() - started, args.quick, params,
                                         log_root)
                docs_page.write(out, results, info)
    finally:
        stack.down()
    print(f"chaos: {len(results)} runs in {(time.monotonic() - started) / 60:.1f} min; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
