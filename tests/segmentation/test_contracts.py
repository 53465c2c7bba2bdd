"""The output contracts (``segmentation.contracts``): the committed JSON Schemas are the generated
ones, and what the code writes on each topic validates against its model, strictly, field for field
(no field the model lacks, none it has missing) and, where the record is compact JSON, byte for
byte as the model writes it back.

The records come from the code that builds them, called without a broker: ``score_batch`` and
``dead_letter`` (``consumer.scoring``), ``change_value`` and ``cause_of`` (``consumer.changes``),
and ``ModelLog``'s records (``segmentation.model_log``) with its ``append`` captured."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any, get_args

import pytest
from pydantic import BaseModel, ValidationError

from consumer.changes import Recorded, cause_of, change_value
from consumer.model import NEW_SEGMENT_STATUSES, ActiveModel
from consumer.scoring import (
    OutRecord,
    ScoringRules,
    dead_letter,
    score_batch,
    stripped_dead_letter,
)
from segmentation.bundle import ModelBundle, SegmentDiff
from segmentation.contracts import (
    MODELS_TOPIC_RECORDS,
    SCHEMA_DIR,
    SCHEMAS,
    AssignmentRecord,
    CurrentRecord,
    DeadLetterHeaders,
    DeadLetterReason,
    NewSegmentStatus,
    PinnedRecord,
    ReservedRecord,
    SegmentChange,
    schema_text,
)
from segmentation.domain import CHANGE_CAUSES
from segmentation.events import REASONS, CustomerEvent, InputContract, Rejection
from segmentation.model_log import CHALLENGER, CURRENT, PINNED, RESERVED, ModelLog
from segmentation.store.models import Counters
from tests.support.messages import (
    DEMO_MODEL,
    DEMO_RULES,
    FEATURES,
    NOW_MS,
    SMALL_MODEL,
    SMALL_RULES,
    Msg,
    demo_values,
    event,
    small_bundle,
)


def committed(model: type[BaseModel]) -> dict[str, Any]:
    """The committed JSON Schema of ``model``."""
    (name,) = [n for n, m in SCHEMAS.items() if m is model]
    schema: dict[str, Any] = json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text(encoding="utf-8"))
    return schema


def within(schema: dict[str, Any], names: Sequence[str]) -> None:
    """``names`` (a record's fields) are the committed schema's properties, the required ones
    among them (without a JSON Schema validator in the environment, the structure is checked)."""
    assert set(schema["required"]) <= set(names) <= set(schema["properties"]), names


def strictly(model: type[BaseModel], value: bytes | None) -> Any:
    """``value`` validated as ``model`` (strict JSON), with exactly the model's fields."""
    assert value is not None
    record = model.model_validate_json(value, strict=True)
    assert list(json.loads(value)) == list(model.model_fields), value
    within(committed(model), list(json.loads(value)))
    return record


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- the schemas ---------------------------------------------------------------------------------
def test_the_committed_schemas_are_the_generated_ones() -> None:
    committed = {p.name for p in SCHEMA_DIR.glob("*.json")}
    assert committed == {f"{name}.schema.json" for name in SCHEMAS}, "run `make schema`"
    for name in SCHEMAS:
        text = (SCHEMA_DIR / f"{name}.schema.json").read_text(encoding="utf-8")
        assert text == schema_text(name), f"schemas/{name}.schema.json is stale: run `make schema`"


def test_every_field_of_every_schema_is_described_for_subscribers() -> None:
    for name in SCHEMAS:
        schema = json.loads(schema_text(name))
        assert schema["description"], name
        if SCHEMAS[name] is not ModelBundle:  # the bundle's nested models: segmentation.bundle
            assert [p for p, s in schema["properties"].items() if not s.get("description")] == [], name


def test_the_allowed_values_are_the_code_s() -> None:
    assert get_args(DeadLetterReason) == REASONS
    assert get_args(NewSegmentStatus) == NEW_SEGMENT_STATUSES
    assert get_args(SegmentChange.model_fields["cause"].annotation) == CHANGE_CAUSES
    assert set(MODELS_TOPIC_RECORDS) == {"v<N>", CURRENT, PINNED, CHALLENGER, RESERVED}


# --- customer-segments ---------------------------------------------------------------------------
def assignments(messages: Sequence[Msg], model: ActiveModel, rules: ScoringRules) -> list[AssignmentRecord]:
    batch = score_batch(messages, model, rules, NOW_MS)
    assert batch.dead_letters == () and len(batch.outputs) == len(messages)
    records = []
    for out in batch.outputs:
        record = strictly(AssignmentRecord, out.value)
        assert record.model_dump_json().encode() == out.value  # byte for byte, in this order
        assert out.key == record.customer_id.encode()
        records.append(record)
    return records


def test_scored_events_validate_as_assignment_records() -> None:
    """The demo's model: six features, segment names that need escaping in JSON."""
    records = assignments([Msg(v, i) for i, v in enumerate(demo_values(200))], DEMO_MODEL, DEMO_RULES)
    assert {r.segment for r in records} >= {'quote " and \\ backslash', "é accents"}
    assert {r.model_version for r in records} == {DEMO_MODEL.version}


def test_assignment_records_at_the_edges_validate() -> None:
    """No event_id, ids that need escaping, event times from year 1 to 9999, a huge distance."""
    unbounded = ScoringRules(InputContract(FEATURES, {f: (-1e12, 1e12) for f in FEATURES},
                                           require_key_match=True), "out", "dlq", 50_000)
    values = [
        event(event_id=None), event(customer_id='c "é" \\ \t', event_id="e\u2028"),
        event(event_time=-62_135_596_800_000), event(event_time=253_402_300_799_999),
        event(event_time=-1), event(event_time="2026-11-29T10:15:00.5+05:30"),
        event(features={"a": 1e11, "b": -1e11}),
    ]
    records = assignments([Msg(v, i) for i, v in enumerate(values)], SMALL_MODEL, unbounded)
    assert records[0].event_id is None and records[1].customer_id == 'c "é" \\ \t'
    assert [r.event_time[:4] for r in records[2:5]] == ["0001", "9999", "1969"]
    assert records[5].event_time == "2026-11-29T04:45:00.500Z" and records[6].distance > 1e10


def with_radii() -> ActiveModel:
    quality = {**small_bundle()["quality"], "radius_p99": [1.0, 1.0], "radius_outlier": [3.0, 3.0]}
    return ActiveModel.of(ModelBundle.model_validate(small_bundle(quality=quality)))


def test_outlier_and_novel_events_validate_with_their_flag() -> None:
    """``novel`` (beyond the training p99) is not in the record; ``outlier`` is."""
    model = with_radii()
    near, novel, far = (event(features={"a": a, "b": a}) for a in (0.1, 1.5, 40.0))
    batch = score_batch([Msg(near, 0), Msg(novel, 1), Msg(far, 2)], model, SMALL_RULES, NOW_MS)
    assert batch.novel.tolist() == [False, True, True] and batch.outliers.tolist() == [False, False, True]
    assert [strictly(AssignmentRecord, o.value).outlier for o in batch.outputs] == [False, False, True]


# --- customer-events-dlq -------------------------------------------------------------------------
def headers_of(record: OutRecord) -> DeadLetterHeaders:
    for name, value in record.headers:
        if name.startswith("dlq."):
            assert isinstance(value, bytes)
            value.decode("utf-8")  # every dlq.* value is UTF-8 text
    within(committed(DeadLetterHeaders), [name for name, _ in record.headers if name.startswith("dlq.")])
    return DeadLetterHeaders.of(record.headers)


HOSTILE = {
    "not_json": Msg(b"\xff\xfe\x00binary", _key=b"\x00\x01"),
    "not_object": Msg(b"[1, 2]"),
    "missing_field": Msg(b'{"customer_id": "c-1"}'),
    "wrong_type": Msg(event(features={"a": "1", "b": 2})),
    "bad_event_time": Msg(event(event_time="1764410100")),
    "key_mismatch": Msg(event(), _key=b"someone-else"),
    "missing_feature": Msg(event(features={"a": 1})),
    "non_finite": Msg(event().replace(b"1.0", b"NaN")),
    "out_of_range": Msg(event(features={"a": 1e300, "b": 2})),
    "too_large": Msg(b"\x80" * 70_000, _key=b"\xff" * 2000),
    "too_long": Msg(event(event_id="e" * 300)),
    "event_time_out_of_range": Msg(event(event_time=NOW_MS + 10**9)),
}


def test_every_dead_letter_validates_and_every_reason_is_produced() -> None:
    messages = list(HOSTILE.values())
    batch = score_batch(messages, SMALL_MODEL, SMALL_RULES, NOW_MS)
    assert batch.outputs == () and batch.reasons == tuple(HOSTILE)
    letters = list(batch.dead_letters)
    # the two reasons no decoding gives: an exception while scoring, an output the broker refused
    letters.append(dead_letter(Msg(event()), Rejection("internal_error", "ValueError: x" * 200), "dlq",
                               error="ValueError"))
    output = score_batch([Msg(event(), 9)], SMALL_MODEL, SMALL_RULES, NOW_MS).outputs[0]
    refused = SMALL_RULES.replacement(output, "Broker: Message size too large")
    assert refused is not None
    letters.append(refused)
    found = [headers_of(r) for r in letters]
    assert [h.reason for h in found] == [*HOSTILE, "internal_error", "output_rejected"]
    assert {h.reason for h in found} == set(REASONS)
    for h in found:
        assert (h.source_topic, h.source_partition) == ("in", "0")
        assert (h.error is not None) == (h.reason in ("internal_error", "output_rejected"))
    assert found[-2].error == "ValueError" and len(found[-2].detail) == 1000


def test_a_truncated_and_a_stripped_dead_letter_say_what_the_original_was() -> None:
    big, key = HOSTILE["too_large"].value(), HOSTILE["too_large"].key()
    assert big is not None and key is not None
    (letter,) = score_batch([HOSTILE["too_large"]], SMALL_MODEL, SMALL_RULES, NOW_MS).dead_letters
    h = headers_of(letter)
    assert h.truncated == "true" and letter.value == big[:len(letter.value or b"")]
    assert (h.original_value_bytes, h.original_value_sha256) == (str(len(big)), sha256(big))
    assert (h.original_key_bytes, h.original_key_sha256) == (str(len(key)), sha256(key))
    stripped = stripped_dead_letter(letter)
    assert stripped is not None and stripped.key is None and stripped.value is None
    s = headers_of(stripped)
    assert s.reason == "too_large" and s.original_value_bytes == str(len(letter.value or b""))
    tombstone = headers_of(score_batch([Msg(None)], SMALL_MODEL, SMALL_RULES, NOW_MS).dead_letters[0])
    assert tombstone.reason == "not_json" and tombstone.original_value_bytes is None


def test_a_dead_letter_with_the_original_s_own_headers_validates() -> None:
    """Many binary headers (some dropped), and a message re-produced from the dead-letter topic
    with its old ``dlq.*`` headers: those are left out, so every ``dlq.*`` header is about this
    rejection."""
    old: list[tuple[str, bytes | None]] = [("dlq.reason", b"too_long"), ("dlq.source.offset", b"12")]
    binary: list[tuple[str, bytes | None]] = [(f"h{i}", bytes(range(256)) * 4) for i in range(20)]
    msg = Msg(b"garbage", 5, _headers=old + binary)
    (letter,) = score_batch([msg], SMALL_MODEL, SMALL_RULES, NOW_MS).dead_letters
    h = headers_of(letter)
    assert (h.reason, h.source_offset, h.headers_dropped) == ("not_json", "5", "7")
    names = [name for name, _ in letter.headers]
    assert names[:15] == [f"h{i}" for i in range(15)]
    assert names.count("dlq.reason") == 1 and ("dlq.source.offset", b"12") not in letter.headers


def test_headers_the_contract_does_not_allow_are_refused() -> None:
    good = dict(headers_of(score_batch([Msg(b"x")], SMALL_MODEL, SMALL_RULES, NOW_MS).dead_letters[0])
                .model_dump(by_alias=True, exclude_none=True))
    for bad in ({"dlq.reason": "bored"}, {"dlq.source.offset": "-1"}, {"dlq.truncated": "yes"},
                {"dlq.original.value.sha256": "abc"}, {"dlq.detail": "x" * 1001}):
        with pytest.raises(ValidationError):
            DeadLetterHeaders.of(list({**good, **bad}.items()))


# --- customer-segment-changes --------------------------------------------------------------------
def moved(version: int) -> ActiveModel:
    """The small model under another version; segment 0's centre moved next to (3, 3)."""
    raw = small_bundle(version=version, centroids=[[-3, -3, 1, 0], [5, 5, 0, 1]])
    return ActiveModel.of(ModelBundle.model_validate(raw))


def change(value: bytes) -> SegmentChange:
    record: SegmentChange = strictly(SegmentChange, value)
    assert record.model_dump_json().encode() == value  # byte for byte, in this order
    return record


def test_every_change_cause_validates() -> None:
    e = CustomerEvent.model_validate_json(event(features={"a": 2.0, "b": 2.0}))
    v2 = moved(2)
    models = {1: SMALL_MODEL, 2: v2}.get
    before = Recorded(0, "x", 1, NOW_MS - 1)
    causes = {
        "initial": "initial",
        "behaviour": cause_of(e, Recorded(1, "y", 2, NOW_MS - 1), 2, models),
        "model": cause_of(e, before, 2, models),  # v1 still puts (2, 2) in segment 0, v2 in 1
        "unknown": cause_of(e, before, 2, lambda v: None),
    }
    assert list(causes) == list(causes.values())
    assert set(causes) == set(CHANGE_CAUSES)
    for cause in CHANGE_CAUSES:
        previous = None if cause == "initial" else before
        record = change(change_value(e, e.event_ms, previous, 1, "s1", 2, cause, "2026-11-29T10:15:00.120Z"))
        assert record.cause == cause and (record.from_segment_id is None) == (cause == "initial")


@pytest.mark.parametrize("status, parents", [("split", [0]), ("merged", [0, 3]), ("born", [])])
def test_a_model_change_into_a_new_segment_validates_with_its_lineage(status: str,
                                                                      parents: list[int]) -> None:
    e = CustomerEvent.model_validate_json(event(customer_id="é \"q\"", event_id=None))
    lineage = SegmentDiff.model_validate({"segment_id": 7, "status": status, "parents": parents})
    for cause in CHANGE_CAUSES:  # only a model change names it
        before = None if cause == "initial" else Recorded(0, "x", 1, NOW_MS - 1)
        record = change(change_value(e, e.event_ms, before, 7, "s7", 2, cause, "2026-11-29T10:15:00.120Z",
                                     outlier=True, lineage=lineage))
        named = (record.to_status, record.to_parents)
        assert named == ((status, parents) if cause == "model" else (None, None))
        assert record.outlier and record.event_id is None


def test_changes_the_contract_does_not_allow_are_refused() -> None:
    e = CustomerEvent.model_validate_json(event())
    at = "2026-11-29T10:15:00.120Z"
    good = json.loads(change_value(e, e.event_ms, Recorded(0, "x", 1, 0), 1, "y", 2, "behaviour", at))
    SegmentChange.model_validate_json(json.dumps(good), strict=True)
    for bad in ({"cause": "initial"}, {"from_segment": None}, {"to_status": "split"},
                {"to_status": "kept", "to_parents": [0]}, {"cause": "weather"}, {"to_segment_id": 2**31},
                {"event_time": "2026-11-29T10:15:00Z"}):
        with pytest.raises(ValidationError):
            SegmentChange.model_validate_json(json.dumps({**good, **bad}), strict=True)


# --- segment-models ------------------------------------------------------------------------------
class CapturedLog(ModelLog):
    """A ``ModelLog`` whose records are kept instead of produced."""

    def __init__(self) -> None:  # no producer
        self.max_bundle_bytes = 1_000_000
        self.records: list[tuple[str, bytes | None]] = []

    def append(self, records: list[tuple[str, bytes | None]]) -> int:
        self.records += records
        return len(self.records)


def test_every_models_topic_record_validates_as_its_key_s_kind() -> None:
    log = CapturedLog()
    v1, v2 = SMALL_MODEL.bundle, DEMO_MODEL.bundle
    log.publish(v1)
    log.set_challenger(v2, Counters(3, 10))
    log.clear_challenger(Counters(3, 10))
    log.withdraw(3, current=1)
    log.pin(1)
    log.pin(None)
    log.clear_challenger(Counters(0, 0))
    kinds = []
    for key, value in log.records:
        kind = "v<N>" if key.startswith("v") else key
        kinds.append(kind)
        if value is None:  # a tombstone: a withdrawn version, an emptied challenger slot
            assert kind in ("v<N>", CHALLENGER)
            continue
        model = MODELS_TOPIC_RECORDS[kind]
        record = model.model_validate_json(value, strict=model is not ModelBundle)
        assert list(json.loads(value)) == list(model.model_fields)
        within(committed(model), list(json.loads(value)))
        if kind == "v<N>":
            assert isinstance(record, ModelBundle) and key == f"v{record.version}"
    assert set(kinds) == set(MODELS_TOPIC_RECORDS)
    pinned = [PinnedRecord.model_validate_json(v or b"").version for k, v in log.records if k == PINNED]
    assert pinned == [1, None]
    assert ReservedRecord.model_validate_json(log.records[-1][1] or b"").version == 0


def test_models_topic_records_the_contract_does_not_allow_are_refused() -> None:
    for model, bad in ((CurrentRecord, b'{"version": null}'), (CurrentRecord, b'{"version": 0}'),
                       (PinnedRecord, b'{"version": true}'), (ReservedRecord, b'{"version": 1}')):
        with pytest.raises(ValidationError):
            model.model_validate_json(bad, strict=True)
