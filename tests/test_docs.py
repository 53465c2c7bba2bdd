"""Documents generated from the code stay current, and links between documents resolve."""

from __future__ import annotations

import functools
import inspect
import itertools
import re
from pathlib import Path

from segmentation.settings_table import markdown

ROOT = Path(__file__).resolve().parent.parent


def test_the_settings_reference_is_generated_from_the_current_settings() -> None:
    committed = (ROOT / "docs" / "settings.md").read_text()
    assert committed == markdown(), "docs/settings.md is stale: run `make docs`"


def test_every_relative_link_in_the_readme_and_docs_resolves() -> None:
    broken = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", doc.read_text()):
            if not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_the_readme_stays_a_front_door() -> None:
    assert len((ROOT / "README.md").read_bytes()) <= 10_500


def test_the_readme_s_commands_assume_no_sudo() -> None:
    """Root shells and containers often have no sudo: the two commands must not need it."""
    assert "sudo " not in (ROOT / "README.md").read_text()


def test_every_dead_letter_reason_is_documented_where_operators_look() -> None:
    from segmentation.events import REASONS

    rows = {
        "docs/design.md": r"^\| `dlq.reason` \|(.*)$",
        "docs/operations.md": r"^\| `segment_dead_letters_total` \|.*?`reason`:([^|]*)\|",
    }
    for doc, row in rows.items():
        found = re.search(row, (ROOT / doc).read_text(), re.MULTILINE)
        assert found, f"{doc}: no row lists the dead-letter reasons"
        assert set(re.findall(r"\w+", found.group(1))) == set(REASONS), doc


def section(doc: str, heading: str) -> str:
    """The text of ``doc`` under ``heading`` (a line of its own), to the next heading."""
    text = (ROOT / doc).read_text()
    start = text.index(f"\n{heading}\n") + len(heading) + 2
    end = re.search(r"^#", text[start:], re.MULTILINE)
    return text[start:start + end.start()] if end else text[start:]


def first_column(table: str) -> list[str]:
    """The backticked names in the first column of a Markdown table's rows, with ``{a,b}``
    alternatives expanded (``x.{a,b}.y`` is ``x.a.y`` and ``x.b.y``)."""
    names = []
    for row in re.findall(r"^\| ([^|]+) \|", table, re.MULTILINE):
        for name in re.findall(r"`([^`]+)`", row):
            parts = [p.split(",") for p in re.split(r"\{([^}]*)\}", name)]
            names += ["".join(choice) for choice in itertools.product(*parts)]
    return names


def test_the_documented_dead_letter_headers_are_the_contract_s() -> None:
    from segmentation.contracts import DeadLetterHeaders

    table = section("docs/design.md", "### Dead letters: `customer-events-dlq`")
    documented = first_column(table)
    assert sorted(documented) == sorted(str(f.alias) for f in DeadLetterHeaders.model_fields.values())


def redis_keys() -> set[str]:
    """Every key and channel of ``segmentation.store.keys.Keys`` under the prefix ``seg``, with a
    ``<>`` for each of its parts (``seg:bundle:<>``)."""
    from segmentation.store.keys import Keys

    keys = Keys("seg")
    found = set()
    for name, member in inspect.getmembers(Keys):
        if name.startswith("_") or name in ("everything", "prefix"):
            continue
        if isinstance(member, property):
            found.add(getattr(keys, name))
        else:
            found.add(getattr(keys, name)("<>"))
    return found


def test_the_documented_redis_keys_are_the_store_s() -> None:
    import segmentation.store.keys

    normal = functools.partial(re.sub, r"<[^>]*>", "<>")
    design = section("docs/design.md", "### Model bundle (Redis, JSON, never pickle)")
    paragraph = design[design.index("Redis keys (prefix"):].split("\n\n")[0]
    assert {normal(k) for k in re.findall(r"`(seg:[^`]+)`", paragraph)} == redis_keys(), "docs/design.md"
    listed = re.findall(r"^    P(:\S+)", segmentation.store.keys.__doc__ or "", re.MULTILINE)
    assert {normal("seg" + k) for k in listed} == redis_keys(), "segmentation/store/keys.py"
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        named = {normal(k) for k in re.findall(r"`(seg:[a-z_]+(?::<[^>`]*>)?)", doc.read_text())}
        assert named <= redis_keys(), f"{doc.relative_to(ROOT)} names keys the store has not"


def test_the_documented_models_topic_records_are_the_code_s() -> None:
    import segmentation.model_log
    from segmentation.contracts import MODELS_TOPIC_RECORDS

    kinds = set(MODELS_TOPIC_RECORDS)
    table = section("docs/design.md", "### Models topic: `segment-models` (compacted, one partition)")
    assert set(first_column(table)) == kinds, "docs/design.md"
    listed = re.findall(r"^    (\S+)  ", segmentation.model_log.__doc__ or "", re.MULTILINE)
    assert set(listed) == kinds, "segmentation/model_log.py"
    readme = re.search(r"^\* \*\*Models\*\* `segment-models`(.*?)^\*", (ROOT / "README.md").read_text(),
                       re.MULTILINE | re.DOTALL)
    assert readme and set(re.findall(r"`(v<N>|[a-z]+)`", readme.group(1))) >= kinds, "README.md"


def test_every_fast_twin_of_the_chaos_table_names_a_test_that_exists() -> None:
    text = (ROOT / "chaos" / "fast_twins.md").read_text()
    assert text.rstrip() in (ROOT / "docs" / "reliability.md").read_text()
    for row in [line for line in text.splitlines() if line.startswith("| `")]:
        file = None
        for ref in re.findall(r"`([^`]+)`", row.split("|")[2]):
            if ref.startswith("tests/"):
                assert (ROOT / ref).exists(), ref
                continue
            path, _, name = ref.partition("::")
            file = path or file
            assert file is not None and name, ref
            assert f"def {name}(" in (ROOT / "tests" / file).read_text(), ref
