"""``python -m quality.first_models``: whether the trainer's own path (gate included, no
``--force``) publishes a first model on every realistic set, held-out and fresh seeds. The K
table in docs/model-quality.md measures the fit; this counts what a new deployment gets."""

from __future__ import annotations

import logging

from quality.drift import FRESH_SEEDS, realistic_settings
from quality.offline import IdSequences, retrain
from quality.realistic import HELD_OUT_SEEDS, realistic_sets


def first_models(seeds: range) -> list[tuple[str, str]]:
    """(set, outcome) per realistic set of ``seeds``: ``published`` or the checks that refused."""
    settings = realistic_settings()
    rows = []
    for dataset in realistic_sets(seeds):
        run = retrain(dataset.rows, None, IdSequences(), settings)
        outcome = "published" if run.bundle is not None else "refused: " + ", ".join(
            f.check for f in run.failures)
        rows.append((dataset.name, outcome))
    return rows


if __name__ == "__main__":
    logging.basicConfig(level=logging.ERROR)
    for seeds in (HELD_OUT_SEEDS, FRESH_SEEDS):
        rows = first_models(seeds)
        for name, outcome in rows:
            print(f"{name}: {outcome}")
        published = sum(outcome == "published" for _, outcome in rows)
        print(f"seeds {seeds.start}..{seeds.stop - 1}: a first model on {published} of {len(rows)}\n")
