"""``python -m quality``: print the K-selection table and the gate scenarios, and write
docs/model-quality.md. About an hour on two cores, most of it the drift scenarios
(``QUALITY_DRIFT_SEEDS``, default 10, on the held-out and on the fresh seeds)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from quality.cost import scoring_cost
from quality.datasets import bundled_sets, synthetic_sets
from quality.docs_page import (
    ROOT,
    document,
    environment,
    k_markdown,
    k_summary,
    realistic_markdown,
    realistic_summary,
    scenario_markdown,
)
from quality.drift import FRESH_SEEDS, drift_markdown, drift_section, drift_table
from quality.k_table import k_table, realistic_table
from quality.realistic import HELD_OUT_SEEDS, no_structure_sets, realistic_sets
from quality.scenarios import scenario_table
from segmentation.settings import load_settings

DOCUMENT = ROOT / "docs" / "model-quality.md"
# Seeds of the drift scenarios (about 2.5 minutes each on two cores).
DRIFT_SEEDS = int(os.environ.get("QUALITY_DRIFT_SEEDS", "10"))


def main(out: Path = DOCUMENT) -> int:
    logging.basicConfig(level=logging.WARNING)
    settings = load_settings()
    synthetic = synthetic_sets(draws=2)
    k_rows = k_table(bundled_sets() + synthetic, settings)
    print(k_markdown(k_rows), *k_summary(k_rows), sep="\n", flush=True)
    realistic_rows = realistic_table(realistic_sets() + no_structure_sets(), settings)
    print("\n" + realistic_markdown(realistic_rows), *realistic_summary(realistic_rows), sep="\n", flush=True)
    scenarios, first_silhouette = scenario_table(settings)
    print("\n" + scenario_markdown(scenarios), flush=True)
    drift = drift_table(range(HELD_OUT_SEEDS.start, HELD_OUT_SEEDS.start + DRIFT_SEEDS), settings)
    print("\n" + drift_markdown(drift), flush=True)
    fresh = drift_table(range(FRESH_SEEDS.start, FRESH_SEEDS.start + DRIFT_SEEDS), settings)
    print("\n" + drift_markdown(fresh), flush=True)
    cost = scoring_cost(settings)
    out.write_text(document(environment(), k_rows, scenarios, first_silhouette, cost, settings,
                            realistic_rows) + drift_section(drift, fresh))
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
