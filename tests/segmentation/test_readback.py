"""Every record read back is data, never a crash.

A corpus of hostile records for every kind the service reads back from its own topics and Redis
keys (models-topic keys and records, change records, the Redis pointers and counters, replica
states, run-log entries): garbage, nesting 50,000 deep, huge sizes, far-future and far-past times,
wrong types and odd keys. Each is refused with its reason, and what the readers derive from the
records (the models-topic fold, the change-state rebuild, ``Schedule.due``, `show`, `history` and
the report's refusal table) is the same as without it. No broker and no Redis: a dict stands in
for Redis; ``tests/segmentation/test_readback_stack.py`` writes the same records to the real stack.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import consumer.changes
from consumer.changes import Recorded, SegmentChanges, change_value
from consumer.scoring import score_batch
from consumer.service import build_changes
from segmentation.bundle import BundleError, ModelBundle
from segmentation.domain import READBACK_REASONS, READBACK_SOURCES
from segmentation.events import CustomerEvent, event_time_iso
from segmentation.metrics import ConsumerMetrics, TrainerMetrics
from segmentation.model_log import Registry
from segmentation.readback import (
    Limits,
    Readback,
    ReadbackError,
    decode_change,
    decode_json,
    decode_number,
    decode_replica_state,
    decode_run,
    nesting_depth,
)
from segmentation.settings import Settings
from segmentation.store import Keys, ModelStore, ReplicaStates, TrainerState
from segmentation.store.trainer_state import UNREADABLE_PIN
from tests.support.fake_redis import FakeRedis
from tests.support.messages import NOW_MS, SMALL_MODEL, SMALL_RULES, Msg, event, small_bundle
from tests.support.stack import make_settings
from trainer.__main__ import cmd_history, cmd_show, schedule_config
from trainer.challenger import tally
from trainer.html_report import refusal_table
from trainer.schedule import Schedule, highest_novelty, worst_drift

DEEP = 50_000
MB = 1 << 20
SOON_MS = int(time.time() * 1000) + 2 * 3600_000  # later than now + the allowed skew (1 h)
FAR_PAST = "0001-01-01T00:00:00+23:59"  # before year 1 in UTC


def shown(value: object, width: int) -> str:
    """A case's value in its test id. Ids must be the same in every pytest-xdist worker, so a
    time computed from the clock at import is named, not printed."""
    if value in (SOON_MS, SOON_MS / 1000) or value == event_time_iso(SOON_MS):
        return "now + 2 h"
    return str(value)[:width]


def deep(prefix: bytes) -> bytes:
    """``prefix`` and an array nested 50,000 deep (a record that once broke a rebuild)."""
    return prefix + b"[" * DEEP


def padded(prefix: bytes, size: int) -> bytes:
    """A valid JSON object of about ``size`` bytes."""
    return prefix + b', "pad": "' + b"x" * size + b'"}'


class Recorder:
    """A stand-in for ``segment_readback_rejected_total``: remembers every (source, reason)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def labels(self, source: str, reason: str) -> Recorder.Child:
        return Recorder.Child(self, source, reason)

    class Child:
        def __init__(self, parent: Recorder, source: str, reason: str) -> None:
            self.parent, self.key = parent, (source, reason)

        def inc(self, amount: float = 1) -> None:
            self.parent.seen.append(self.key)


def refusal(decode: Callable[[], object]) -> str | None:
    try:
        decode()
    except ReadbackError as exc:
        return exc.reason
    return None


# =============================================================================================
# Bytes before the parser
# =============================================================================================
def test_nesting_depth_ignores_brackets_inside_strings_and_escaped_quotes() -> None:
    assert nesting_depth(rb'["\"[[[", "\\", [[]]]') == 3
    assert nesting_depth(b'{"a": "]]]]"}') == 1
    assert nesting_depth(b"]]]][[") == 2
    assert nesting_depth(b"") == 0


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='[]{}"\\ ab\u2200'),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=40,
)


def depth_of(value: object) -> int:
    if isinstance(value, list):
        return 1 + max(map(depth_of, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(depth_of, value.values()), default=0)
    return 0


@settings(max_examples=200, deadline=None)
@given(json_values, st.booleans())
def test_nesting_depth_is_the_parser_s_depth_of_any_json(value: object, ascii_only: bool) -> None:
    assert nesting_depth(json.dumps(value, ensure_ascii=ascii_only).encode()) == depth_of(value)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(['[', '{', ']', '}', '"', '\\', ':', ',', '1', 'a', '"a":', '[' * 700]),
                max_size=60))
def test_any_bytes_decode_to_json_or_a_readback_error_never_a_recursion_error(parts: list[str]) -> None:
    try:
        decode_json("".join(parts).encode(), Limits(MB, 100))
    except ReadbackError as exc:
        assert exc.reason in READBACK_REASONS


def test_json_in_utf_16_is_refused_before_json_can_guess_the_encoding() -> None:
    # U+2200 is one quote byte in UTF-16: a scan of the bytes would think the brackets are in a string
    hidden = ('{"a": "\u2200", "b": ' + "[" * 3000 + "]" * 3000 + "}").encode("utf-16-le")
    assert refusal(lambda: decode_json(hidden, Limits(MB, 4))) == "not_json"


# =============================================================================================
# The models topic: keys, pointers, counters, bundles
# =============================================================================================
def bundle(version: int, segment_ids: list[int], base: int | None = None) -> bytes:
    return ModelBundle.model_validate(
        small_bundle(version=version, segment_ids=segment_ids, previous_version=base)).to_json().encode()


GOOD_MODEL_LOG: list[tuple[bytes | None, bytes | None]] = [
    (b"v1", bundle(1, [0, 1])),
    (b"current", b'{"version": 1}'),
    (b"v2", bundle(2, [0, 2], base=1)),
    (b"current", b'{"version": 2}'),
    (b"v3", bundle(3, [0, 3], base=2)),
    (b"v3", None),  # v3 lost the publish race
    (b"pinned", b'{"version": 2}'),
    (b"challenger", bundle(4, [0, 4], base=2)),
    (b"reserved", b'{"version": 4, "next_segment_id": 5}'),
]


def pointer_corpus(key: bytes, field: str = "version") -> dict[str, tuple[bytes | None, bytes | None, str]]:
    def with_field(raw: bytes) -> bytes:
        return b'{"' + field.encode() + b'": ' + raw + (b', "version": 1}' if field != "version" else b"}")

    name = key.decode()
    return {
        f"{name}: garbage": (key, b"\xff not json", "not_json"),
        f"{name}: nested 50,000 deep": (key, deep(b'{"version":'), "too_large"),
        f"{name}: nested 500 deep": (key, b'{"version":' + b"[" * 500 + b"]" * 500 + b"}", "too_deep"),
        f"{name}: 1 MB": (key, padded(b'{"version": 1', MB), "too_large"),
        f"{name}: not an object": (key, b"[1]", "wrong_type"),
        f"{name}: {field} missing": (key, b'{"other": 1}', "wrong_type"),
        f"{name}: {field} a string": (key, with_field(b'"1"'), "wrong_type"),
        f"{name}: {field} true": (key, with_field(b"true"), "wrong_type"),
        f"{name}: {field} a float": (key, with_field(b"1.0"), "wrong_type"),
        f"{name}: {field} negative": (key, with_field(b"-1"), "wrong_type"),
        f"{name}: {field} beyond 2**53": (key, with_field(str(2**53).encode()), "wrong_type"),
        f"{name}: {field} of 5000 digits": (key, with_field(b"1" + b"0" * 5000), "too_large"),
        f"{name}: {field} an array": (key, with_field(b"[1]"), "wrong_type"),
    }


HOSTILE_MODEL_LOG: dict[str, tuple[bytes | None, bytes | None, str]] = {
    **{f"tombstone keyed {key!r}": (key, None, "bad_key") for key in [
        "v²".encode(), b"v-1", b"v", b"v1e3", b"", None, b"v01", b"v0", "v\u0661".encode(), b"v 1",
        b"V1", b"v1\n", b"v\xff", b"v" + b"9" * 17, b"v" + b"1" * 10_000]},
    "an unknown key": (b"latest", b'{"version": 1}', "bad_key"),
    **pointer_corpus(b"current"),
    **pointer_corpus(b"pinned"),
    **pointer_corpus(b"reserved"),
    **pointer_corpus(b"reserved", "next_segment_id"),
    "reserved: next_segment_id beyond 2**31": (b"reserved", b'{"version": 1, "next_segment_id": 2147483649}',
                                                "wrong_type"),
    "challenger: garbage": (b"challenger", b"\xff", "not_json"),
    "challenger: nested 50,000 deep": (b"challenger", deep(b'{"version":'), "too_deep"),
    "challenger: not a bundle": (b"challenger", b'{"version": "x"}', "wrong_type"),
    "challenger: a bundle with a wrong field": (b"challenger", bundle(5, [9, 10]).replace(
        b'"segment_names":["x","y"]', b'"segment_names":[1,2]'), "wrong_type"),
    "a version: garbage": (b"v9", b"{oops", "not_json"),
    "a version: nested 50,000 deep": (b"v9", deep(b'{"version":'), "too_deep"),
    "a version: a bundle under another version's key": (b"v9", bundle(8, [0, 8]), "bad_key"),
    "a version: a bundle under v²": ("v²".encode(), bundle(2, [0, 2]), "bad_key"),
    "challenger: 2 MB": (b"challenger", padded(bundle(5, [9, 10])[:-1], 2 * MB), "too_large"),
    "a version: 2 MB": (b"v9", padded(bundle(9, [0, 9])[:-1], 2 * MB), "too_large"),
}


def fold(records: Sequence[tuple[bytes | None, bytes | None]], recorder: Recorder | None = None) -> Registry:
    registry = Registry(readback=Readback(recorder))
    for offset, (key, value) in enumerate(records):
        registry.apply(key, value, offset)
    return registry


def registry_state(r: Registry) -> tuple[object, ...]:
    return (r.bundles, r.current, r.pinned, r.challenger, r.reserved, r.max_version, r.next_segment_id,
            r.current_bundle())


def test_the_good_models_topic_folds_as_it_always_did() -> None:
    registry = fold(GOOD_MODEL_LOG)
    assert sorted(registry.bundles) == [1, 2] and registry.current == 2 and registry.pinned == 2
    assert registry.challenger is not None and registry.challenger.version == 4
    assert (registry.max_version, registry.next_segment_id, registry.invalid_records) == (4, 5, 0)


@pytest.mark.parametrize("name", list(HOSTILE_MODEL_LOG))
def test_a_hostile_models_topic_record_is_refused_and_the_fold_is_as_without_it(name: str) -> None:
    key, value, reason = HOSTILE_MODEL_LOG[name]
    good = registry_state(fold(GOOD_MODEL_LOG))
    for at in (0, 4, len(GOOD_MODEL_LOG)):  # first, in the middle, last
        recorder = Recorder()
        registry = fold([*GOOD_MODEL_LOG[:at], (key, value), *GOOD_MODEL_LOG[at:]], recorder)
        assert recorder.seen == [("models_topic", reason)], (name, at)
        assert registry.invalid_records == 1 and registry_state(registry) == good, (name, at)


# =============================================================================================
# The changes topic (rows 1 and 4)
# =============================================================================================
def change(customer: str, segment_id: int, segment: str, version: int, event_ms: int) -> bytes:
    e = CustomerEvent(customer_id=customer, event_time=event_ms, event_id=f"e-{customer}", features={})
    return change_value(e, event_ms, None, segment_id, segment, version, "initial", "T")


def without(value: bytes, field: str) -> bytes:
    return json.dumps({k: v for k, v in json.loads(value).items() if k != field}).encode()


def edited(value: bytes, **fields: Any) -> bytes:
    record = json.loads(value)
    record.update(fields)
    return json.dumps(record).encode()


BEFORE_MS = NOW_MS - 60_000
GOOD_CHANGES: list[tuple[bytes | None, bytes | None]] = [
    (b"c-1", change("c-1", 0, "x", 1, BEFORE_MS)),
    (b"c-2", change("c-2", 1, "y", 1, BEFORE_MS)),
    (b"c-3", change("c-3", 0, "x", 1, BEFORE_MS)),
    (b"c-3", change("c-3", 1, "y [[[[", 1, BEFORE_MS + 1)),  # brackets in a name are just text
]
C1 = GOOD_CHANGES[0][1] or b""
FIELD_GARBAGE: dict[str, list[tuple[object, str]]] = {
    "to_segment_id": [("0", "wrong_type"), (True, "wrong_type"), (-1, "wrong_type"), (2**31, "wrong_type"),
                      (1.0, "wrong_type"), ([0], "wrong_type"), (None, "wrong_type")],
    "to_segment": [(5, "wrong_type"), ("", "wrong_type"), ("x" * 201, "wrong_type"), (None, "wrong_type"),
                   (["x"], "wrong_type")],
    "to_model_version": [(0, "wrong_type"), ("1", "wrong_type"), (True, "wrong_type"),
                         (2**53, "wrong_type"), (None, "wrong_type")],
    "event_time": [("9999-12-31T23:59:59.999Z", "bad_time"), (event_time_iso(SOON_MS), "bad_time"),
                   (FAR_PAST, "bad_time"), ("2025-11-29T10:00:00", "bad_time"), ("x", "bad_time"),
                   (NOW_MS, "wrong_type"), ("9" * 65, "wrong_type"), (None, "wrong_type")],
}
HOSTILE_CHANGES: dict[str, tuple[bytes | None, bytes | None, str]] = {
    **{f"{field} = {shown(bad, 30)}": (b"c-1", edited(C1, **{field: bad}), reason)
       for field, cases in FIELD_GARBAGE.items() for bad, reason in cases},
    **{f"{field} missing": (b"c-1", without(C1, field), "wrong_type") for field in FIELD_GARBAGE},
    "nested 50,000 deep (row 1)": (b"c-1", deep(b'{"to_segment_id":'), "too_deep"),
    "an array nested 50,000 deep": (b"c-1", b"[" * DEEP + b"]" * DEEP, "too_deep"),
    "to_segment nested 40 deep": (b"c-1", edited(C1, to_segment=[[[[[[[[["x"]]]]]]]]]), "too_deep"),
    "1.1 MB": (b"c-1", padded(C1[:-1], 1_100_000), "too_large"),
    "garbage": (b"c-1", b"\xff not json", "not_json"),
    "empty": (b"c-1", b"", "not_json"),
    "a tombstone": (b"c-1", None, "not_json"),
    "not an object": (b"c-1", b"[1, 2]", "wrong_type"),
    "a change dated 9999-12-31 for a new customer (row 4)": (
        b"c-9", edited(C1, event_time="9999-12-31T00:00:00.000Z"), "bad_time"),
    **{f"keyed {key!r:.30}": (key, C1, "bad_key") for key in [None, b"", b"\xff\xfe", b"c" * 257]},
}


def rebuilt(records: Sequence[tuple[bytes | None, bytes | None]], monkeypatch: pytest.MonkeyPatch,
            settings: Settings | None = None) -> SegmentChanges:
    """A member's state of partition 0 rebuilt from ``records`` (the changes topic, no broker)."""
    msgs = [Msg(value, offset, key) for offset, (key, value) in enumerate(records)]

    def read_to_end(*_: object) -> Iterator[Msg]:
        return iter(msgs)

    monkeypatch.setattr(consumer.changes, "read_to_end", read_to_end)
    changes = build_changes(settings or make_settings(), ConsumerMetrics(), lambda v: None)
    changes._reader = object()  # type: ignore[assignment]  # no broker: read_to_end is the stand-in
    changes.prepare([Msg(b"", 0)])
    return changes


def later_events(changes: SegmentChanges) -> list[dict[str, object]]:
    """What the next events of c-1, c-2 and c-9 make of the rebuilt state (a moved c-1)."""
    values = [event(customer_id="c-1", features={"a": 5, "b": 5}), event(customer_id="c-2", event_id="e-2"),
              event(customer_id="c-9", event_id="e-9")]
    batch = score_batch([Msg(v, i) for i, v in enumerate(values)], SMALL_MODEL, SMALL_RULES, NOW_MS)
    return [json.loads(r.value or b"") for r in changes.detect(batch, SMALL_MODEL, "now").records]


def test_the_good_changes_topic_rebuilds_the_last_segment_of_each_customer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    state = rebuilt(GOOD_CHANGES, monkeypatch).state[0]
    assert state == {"c-1": Recorded(0, "x", 1, BEFORE_MS), "c-2": Recorded(1, "y", 1, BEFORE_MS),
                     "c-3": Recorded(1, "y [[[[", 1, BEFORE_MS + 1)}


@pytest.mark.parametrize("name", list(HOSTILE_CHANGES))
def test_a_hostile_change_record_is_refused_and_the_rebuilt_state_is_as_without_it(
    name: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    key, value, reason = HOSTILE_CHANGES[name]
    good = rebuilt(GOOD_CHANGES, monkeypatch)
    changes = rebuilt([*GOOD_CHANGES, (key, value)], monkeypatch)
    assert changes.state == good.state
    m = changes.metrics.registry
    assert m.get_sample_value("segment_readback_rejected_total",
                              {"source": "changes_topic", "reason": reason}) == 1.0
    assert m.get_sample_value("segment_change_records_invalid_total") == 1.0
    # and the next real events: c-1 moved (a behaviour change, never "late"), c-9 is new
    assert later_events(changes) == later_events(good)
    assert changes.metrics.registry.get_sample_value("segment_change_late_events_total") == 0.0


def test_a_change_as_large_as_the_largest_input_message_allows_is_read_back() -> None:
    huge_id = "c" * 10_000  # SEG_MAX_ID_CHARS at most; a message of up to 900,000 bytes
    record = edited(C1, customer_id=huge_id, event_id="é" * 10_000, pad="x" * 800_000)
    assert decode_change(record, latest_ms=NOW_MS).segment_id == 0


def test_a_change_dated_9999_is_refused_so_the_customer_s_next_event_is_a_change_not_late(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Row 4: today a record dated 9999-12-31 made every later event of its customer late."""
    future = (b"c-1", edited(C1, to_segment_id=1, to_segment="y", event_time="9999-12-31T00:00:00.000Z"))
    records = later_events(rebuilt([*GOOD_CHANGES, future], monkeypatch))
    assert [(r["customer_id"], r["cause"], r["from_segment_id"]) for r in records] == [
        ("c-1", "behaviour", 0), ("c-2", "behaviour", 1), ("c-9", "initial", None)]


def test_the_latest_change_time_follows_the_configured_skew(monkeypatch: pytest.MonkeyPatch) -> None:
    soon = edited(C1, event_time=event_time_iso(SOON_MS))
    assert rebuilt([(b"c-1", soon)], monkeypatch).state[0] == {}
    relaxed = make_settings(max_event_skew_s=4 * 3600.0)
    assert rebuilt([(b"c-1", soon)], monkeypatch, relaxed).state[0]["c-1"].event_ms == SOON_MS
    assert decode_change(soon, latest_ms=SOON_MS).event_ms == SOON_MS


# =============================================================================================
# Redis: pointers and counters, replica states, the run log (rows 2 and 3)
# =============================================================================================
KEYS = Keys("seg")
V1 = bundle(1, [0, 1])
NOW_S = time.time()
GOOD_STATE = {"replica": "a", "model_version": 1, "at": NOW_S, "events_seen": 1000,
              "online_centroids": [[0.1, 0.0, 1.0, 0.0], [5.0, 5.0, 0.0, 1.0]], "counts": [10.5, 3.0],
              "segment_ids": [0, 1], "silhouette_simplified": 0.5, "silhouette_sampled": None,
              "silhouette_drift": -0.3, "novelty_share": 0.05,
              "challenger": {"version": 2, "events": 600, "agreed": 590, "silhouette": 0.5,
                             "champion_silhouette": 0.5}}
REFUSED = {"at": NOW_S - 60, "result": "rejected", "detail": "silhouette 0.1 below 0.2", "version": None,
           "forced": False, "failures": [{"check": "min_silhouette", "value": 0.1, "limit": 0.2,
                                          "detail": "silhouette 0.1 below 0.2"}]}
PUBLISHED = {"at": NOW_S - 30, "result": "published", "detail": "", "version": 1, "forced": False,
             "failures": []}


def redis_with(states: dict[str, bytes], runs: list[bytes], **pointers: bytes) -> FakeRedis:
    """A Redis holding v1 as the current model, ``states``, the run log ``runs`` and ``pointers``."""
    client = FakeRedis()
    client.data[KEYS.bundle(1)] = V1
    client.data[KEYS.current] = b"1"
    client.data[KEYS.versions] = [b"1"]
    client.data[KEYS.version_seq] = b"1"
    client.data[KEYS.segment_id_seq] = b"2"
    client.data.update({KEYS.online(name): raw for name, raw in states.items()})
    client.data[KEYS.runs] = runs
    client.data.update({getattr(KEYS, name): raw for name, raw in pointers.items()})
    return client


def store_of(client: FakeRedis, metrics: TrainerMetrics | None = None) -> ModelStore:
    counter = metrics.readback_rejected if metrics is not None else None
    return ModelStore(client, "seg", Readback(counter))  # type: ignore[arg-type]


def rejected(metrics: TrainerMetrics, source: str, reason: str) -> float:
    return metrics.registry.get_sample_value(
        "segment_readback_rejected_total", {"source": source, "reason": reason}) or 0.0


POINTER_GARBAGE: dict[str, tuple[bytes, str]] = {
    "x": (b"x", "wrong_type"), "²": ("²".encode(), "wrong_type"), "١": ("\u0661".encode(), "wrong_type"),
    "' 7'": (b" 7", "wrong_type"), "'7 '": (b"7 ", "wrong_type"), "07": (b"07", "wrong_type"),
    "-1": (b"-1", "wrong_type"), "1e3": (b"1e3", "wrong_type"), "1.0": (b"1.0", "wrong_type"),
    "1_0": (b"1_0", "wrong_type"), "empty": (b"", "wrong_type"), "not UTF-8": (b"\xff", "wrong_type"),
    "17 digits": (b"9" * 17, "wrong_type"), "5000 digits": (b"9" * 5000, "too_large"),
    "nested 50,000 deep": (b"[" * DEEP, "too_large"), "a JSON object": (b'{"version":1}', "wrong_type"),
}


@pytest.mark.parametrize("name", list(POINTER_GARBAGE))
def test_a_current_pointer_that_is_not_a_version_is_refused_and_nothing_is_due(name: str) -> None:
    raw, reason = POINTER_GARBAGE[name]
    metrics = TrainerMetrics()
    store = store_of(redis_with({}, [], current=raw), metrics)
    with pytest.raises(BundleError):
        store.current_version()
    assert not store.pointers_readable()
    # `trainer run` goes on: no exit
    assert Schedule(schedule_config(Settings())).due(store, now=10**9) is None
    assert rejected(metrics, "redis_pointer", reason) == 3


@pytest.mark.parametrize("name", list(POINTER_GARBAGE))
def test_pins_counters_offsets_and_version_members_that_are_not_numbers_are_refused(name: str) -> None:
    raw, reason = POINTER_GARBAGE[name]
    metrics = TrainerMetrics()
    pins = store_of(redis_with({}, [], pinned=raw), metrics)
    assert TrainerState.of(pins).pinned() == UNREADABLE_PIN  # held, as before
    counters = store_of(redis_with({}, [], segment_id_seq=raw), metrics)
    with pytest.raises(BundleError):
        counters.counters()
    assert not counters.pointers_readable()
    assert store_of(redis_with({}, [], registry_offset=raw), metrics).registry_offset() is None
    members = redis_with({}, [])
    members.data[KEYS.versions] = [b"1", raw]
    assert store_of(members, metrics).versions() == [1]
    assert rejected(metrics, "redis_pointer", reason) == 5


def test_good_pointers_read_as_numbers() -> None:
    store = store_of(redis_with({}, [], pinned=b"3", registry_offset=b"0"))
    assert store.current_version() == 1 and store.versions() == [1] and store.pointers_readable()
    assert (store.counters().version, store.counters().next_segment_id) == (1, 2)
    assert store.registry_offset() == 0 and TrainerState.of(store).pinned() == 3
    assert decode_number(b"9007199254740991") == 2**53 - 1


# --- replica states ----------------------------------------------------------------------------
def state_with(**fields: Any) -> bytes:
    return json.dumps({**GOOD_STATE, **fields}).encode()


STATE_GARBAGE: dict[str, list[tuple[object, str]]] = {
    "model_version": [("1", "wrong_type"), (True, "wrong_type"), (0, "wrong_type"), (1.5, "wrong_type"),
                      ([1], "wrong_type"), (None, "wrong_type")],
    "at": [("x", "wrong_type"), (1e300, "bad_time"), (-1e18, "bad_time"), (float("nan"), "bad_time"),
           (float("inf"), "bad_time"), (SOON_MS / 1000, "bad_time"), (True, "wrong_type")],
    "replica": [(7, "wrong_type")],
    "events_seen": [(-1, "wrong_type"), ("9", "wrong_type")],
    "online_centroids": [([["a"]], "wrong_type"), ("x", "wrong_type"), ([1, 2], "wrong_type")],
    "counts": [(["1"], "wrong_type")],
    "segment_ids": [([-1], "wrong_type"), ([2**31], "wrong_type")],
    "silhouette_drift": [("-5", "wrong_type"), (True, "wrong_type"), ([-0.9], "wrong_type")],
    "novelty_share": [("0.9", "wrong_type"), ({"x": 1}, "wrong_type")],
    "silhouette_simplified": [("0.9", "wrong_type")],
    "silhouette_sampled": [(False, "wrong_type")],
    "challenger": [("v7", "wrong_type"), ([7, 100], "wrong_type")],
}
HOSTILE_STATES: dict[str, tuple[bytes, str]] = {
    **{f"{field} = {shown(bad, 20)}": (state_with(**{field: bad}), reason)
       for field, cases in STATE_GARBAGE.items() for bad, reason in cases},
    "model_version missing": (without(state_with(), "model_version"), "wrong_type"),
    "nested 50,000 deep (row 3)": (deep(b'{"model_version":'), "too_deep"),
    "a field nested 50,000 deep": (state_with()[:-1] + b', "x": ' + b"[" * DEEP, "too_deep"),
    "17 MB": (padded(state_with()[:-1], 17 * MB), "too_large"),
    "garbage": (b"{oops", "not_json"),
    "not an object": (b"[1, 2]", "wrong_type"),
    "UTF-16": (state_with().decode().encode("utf-16"), "not_json"),
}


def decisions(store: ModelStore) -> list[str | None]:
    """What ``Schedule.due`` decides over a drift that lasts (the signals read from ``store``)."""
    schedule = Schedule(schedule_config(Settings(train_interval_s=600, drift_retrain_after_s=60,
                                 drift_retrain_threshold=0.1, novelty_retrain_share=0.03)))
    schedule.ran("published", now=0.0)
    return [schedule.due(store, now=t) for t in (100.0, 170.0, 700.0)]


def test_the_good_replica_state_drives_the_schedule() -> None:
    store = store_of(redis_with({"a": state_with()}, []))
    assert decisions(store) == [None, "sustained silhouette drift", "interval"]


@pytest.mark.parametrize("name", list(HOSTILE_STATES))
def test_a_hostile_replica_state_is_refused_and_the_schedule_decides_as_without_it(name: str) -> None:
    raw, reason = HOSTILE_STATES[name]
    metrics = TrainerMetrics()
    good = store_of(redis_with({"a": state_with()}, []))
    hostile = store_of(redis_with({"a": state_with(), "b": raw}, []), metrics)
    states = ReplicaStates.of(hostile).all()
    assert states == ReplicaStates.of(good).all() == [json.loads(state_with())]
    assert (worst_drift(states, 1), highest_novelty(states, 1), tally(states, 2)) == (-0.3, 0.05, tally(
        [GOOD_STATE], 2))
    assert decisions(hostile) == decisions(good)
    assert rejected(metrics, "replica_state", reason) == 4  # the read above and three decisions


def test_a_refused_record_is_counted_at_every_read_but_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    metrics = TrainerMetrics()
    client = redis_with({"b": deep(b"[")}, [])
    store = store_of(client, metrics)
    with caplog.at_level(logging.ERROR, logger="segmentation.readback"):
        for _ in range(3):
            assert ReplicaStates.of(store).all() == []
    assert rejected(metrics, "replica_state", "too_deep") == 3
    assert [r.message for r in caplog.records] == ["record read back refused and skipped"]
    client.data[KEYS.online("b")] = b"{oops"  # another bad value: reported again
    with caplog.at_level(logging.ERROR, logger="segmentation.readback"):
        ReplicaStates.of(store).all()
    assert len(caplog.records) == 2


def test_the_memory_of_records_reported_is_bounded() -> None:
    readback = Readback(remember=2)
    error = ReadbackError("not_json", "x")
    first = [readback._first_report(("run_log", str(i), "not_json")) for i in range(3)]
    assert first == [True, True, True] and len(readback._reported) == 2
    assert readback._first_report(("run_log", "0", "not_json"))  # forgotten: reported again
    readback.rejected("run_log", "r", error)  # without a counter: logged, never raises


# --- the run log -------------------------------------------------------------------------------
def run_with(**fields: Any) -> bytes:
    return json.dumps({**REFUSED, **fields}).encode()


RUN_GARBAGE: dict[str, list[tuple[object, str]]] = {
    "at": [("x", "wrong_type"), (None, "wrong_type"), (1e300, "bad_time"), (-1e18, "bad_time"),
           (float("nan"), "bad_time"), (SOON_MS / 1000, "bad_time"), (True, "wrong_type")],
    "result": [(5, "wrong_type"), ("", "wrong_type"), ("r" * 100, "wrong_type"), (None, "wrong_type")],
    "detail": [(5, "wrong_type"), (None, "wrong_type"), (["x"], "wrong_type")],
    "version": [("2", "wrong_type"), (0, "wrong_type"), (True, "wrong_type")],
    "forced": [("yes", "wrong_type"), (1, "wrong_type")],
    "failures": [("x", "wrong_type"), ([1], "wrong_type"), ([{"check": 5}], "wrong_type"),
                 ([{}], "wrong_type"), ([{"check": "c", "value": "0.1"}], "wrong_type"),
                 ([{"check": "c"}] * 65, "wrong_type"),
                 ([{"check": "c", "detail": [[[[["x"]]]]]}], "too_deep")],
}
HOSTILE_RUNS: dict[str, tuple[bytes, str]] = {
    **{f"{field} = {shown(bad, 20)}": (run_with(**{field: bad}), reason)
       for field, cases in RUN_GARBAGE.items() for bad, reason in cases},
    "at missing": (without(run_with(), "at"), "wrong_type"),
    "nested 50,000 deep (row 3)": (deep(b'{"at":'), "too_deep"),
    "300 KB": (padded(run_with()[:-1], 300_000), "too_large"),
    "garbage": (b"{oops", "not_json"),
    "not an object": (b"[]", "wrong_type"),
}
GOOD_RUNS = [json.dumps(PUBLISHED).encode(), run_with()]


def cli_output(store: ModelStore, capsys: pytest.CaptureFixture[str]) -> list[str]:
    """What `show`, `show --json`, `history` and `history --json` print (all exit 0)."""
    printed = []
    for command in (cmd_show, cmd_history):
        for as_json in (False, True):
            assert command(store, as_json) == 0
            printed.append(capsys.readouterr().out)
    return printed


def test_the_good_run_log_is_shown_as_it_was_written(capsys: pytest.CaptureFixture[str]) -> None:
    store = store_of(redis_with({}, GOOD_RUNS))
    assert TrainerState.of(store).runs() == [PUBLISHED, REFUSED]
    show, _, history, _ = cli_output(store, capsys)
    assert "model v1" in show and "refused at" in history and "min_silhouette" in history
    assert "silhouette 0.1 below 0.2" in refusal_table(TrainerState.of(store).runs())


@pytest.mark.parametrize("name", list(HOSTILE_RUNS))
def test_a_hostile_run_log_entry_is_refused_and_show_history_and_report_print_as_without_it(
    name: str, capsys: pytest.CaptureFixture[str],
) -> None:
    raw, reason = HOSTILE_RUNS[name]
    metrics = TrainerMetrics()
    good = store_of(redis_with({}, GOOD_RUNS))
    hostile = store_of(redis_with({}, [GOOD_RUNS[0], raw, GOOD_RUNS[1]]), metrics)
    assert TrainerState.of(hostile).runs() == TrainerState.of(good).runs()
    assert cli_output(hostile, capsys) == cli_output(good, capsys)
    assert refusal_table(TrainerState.of(hostile).runs()) == refusal_table(TrainerState.of(good).runs())
    assert rejected(metrics, "run_log", reason) == 6  # the read above, 4 CLI calls, the table


def test_show_and_history_stay_up_on_a_poisoned_redis(capsys: pytest.CaptureFixture[str]) -> None:
    """Every kind at once: a nested replica state and run entry, a garbage pin and version member."""
    client = redis_with({"a": state_with(), "b": deep(b"{")}, [deep(b"["), *GOOD_RUNS], pinned="²".encode())
    client.data[KEYS.versions] = [b"1", "v²".encode(), b"9" * 5000]
    show, show_json, history, _ = cli_output(store_of(client), capsys)
    assert "pinned by a rollback (v0)" in show and json.loads(show_json)["last_run"] == PUBLISHED
    assert history.startswith("* v1 ")
    client.data[KEYS.current] = b"[" * 500  # history marks no current version then
    assert cmd_history(store_of(client), False) == 0 and capsys.readouterr().out.startswith("  v1 ")


def test_times_read_back_are_bounded_like_input_times() -> None:
    latest = Readback().latest_ms()
    assert abs(latest - (time.time() * 1000 + 3600_000)) < 5_000  # now + SEG_MAX_EVENT_SKEW_S
    assert decode_run(run_with(at=-62_135_596_800.0), latest)["at"] == -62_135_596_800.0  # year 1
    assert refusal(lambda: decode_run(run_with(at=-62_135_596_801.0), latest)) == "bad_time"
    assert refusal(lambda: decode_replica_state(state_with(at=latest / 1000 + 1), latest)) == "bad_time"
    at = latest / 1000 - 1
    assert math.isclose(decode_replica_state(state_with(at=at), latest)["at"], at)


def test_every_source_and_reason_is_exported_at_zero_in_both_services() -> None:
    for metrics in (ConsumerMetrics(), TrainerMetrics()):
        for source in READBACK_SOURCES:
            for reason in READBACK_REASONS:
                assert metrics.registry.get_sample_value(
                    "segment_readback_rejected_total", {"source": source, "reason": reason}) == 0.0
