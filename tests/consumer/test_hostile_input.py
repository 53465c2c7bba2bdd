"""No single message can stop a partition: bounded input, the per-message safety net, dead
letters that always fit, bundle validation, and property-based fuzzing of bytes in, records out.

The fuzz budget is ``SEG_FUZZ_EXAMPLES`` (a few hundred in ``make test``, 10,000 in ``make chaos``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumer.model import ActiveModel
from consumer.scoring import OutRecord, ScoringRules, record_bytes, score_batch
from segmentation.bundle import BundleError, ModelBundle
from segmentation.events import REASONS, InputContract, Rejection
from tests.support.messages import (
    FEATURES,
    FUZZ_EXAMPLES,
    MAX_RECORD,
    NOW_MS,
    SMALL_MODEL,
    SMALL_RULES,
    Msg,
    clipped_bundle,
    demo_values,
    event,
    small_bundle,
)


def score(values: Sequence[bytes | None]) -> tuple[list[OutRecord], list[OutRecord], list[str]]:
    batch = score_batch([Msg(v, _offset=i) for i, v in enumerate(values)], SMALL_MODEL, SMALL_RULES, NOW_MS)
    return list(batch.outputs), list(batch.dead_letters), list(batch.reasons)


def strict_json(raw: bytes) -> object:
    def refuse(constant: str) -> object:
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(raw, parse_constant=refuse)


def assert_one_record_each(values: Sequence[bytes | None]) -> list[str]:
    """The invariant of the per-message path: one output or one dead letter per message, every
    record within the size limit, every output strict JSON."""
    outputs, dead, reasons = score(values)
    sources = sorted(int(r.source.offset() or 0) for r in outputs + dead if r.source is not None)
    assert sources == list(range(len(values)))
    for record in outputs + dead:
        assert record_bytes(record) <= MAX_RECORD
    for record in outputs:
        assert record.value is not None
        assert isinstance(strict_json(record.value), dict)
    assert set(reasons) <= set(REASONS)
    return reasons


# --- messages that once did harm, each a regression test ---------------------------------------

HOSTILE = {
    "customer_id of 500,000 characters": (event(customer_id="c" * 500_000), "too_large"),
    "customer_id over the limit": (event(customer_id="c" * 300), "too_long"),
    "event_id over the limit": (event(event_id="e" * 300), "too_long"),
    "attribute key of 600 KB": (event(attributes={"k" * 600_000: "v"}), "too_large"),
    "attribute value over the limit": (event(attributes={"channel": "v" * 300}), "too_long"),
    "too many attributes": (event(attributes={f"k{i}": "v" for i in range(300)}), "too_long"),
    "event_time 10**17": (event(event_time=10**17), "event_time_out_of_range"),
    "event_time 2**63": (event(event_time=2**63), "event_time_out_of_range"),
    "event_time 253402300800000": (event(event_time=253402300800000), "event_time_out_of_range"),
    "event_time -10**17": (event(event_time=-10**17), "event_time_out_of_range"),
    "event_time year 9999 at -23:59": (event(event_time="9999-12-31T23:59:59-23:59"),
                                       "event_time_out_of_range"),
    "event_time year 1 at +23:59": (event(event_time="0001-01-01T00:00:00+23:59"),
                                    "event_time_out_of_range"),
    "event_time an hour and more ahead": (event(event_time=NOW_MS + 2 * 3600_000), "event_time_out_of_range"),
    "feature an integer of 310 digits": (event(features={"a": 10**310, "b": 1}), "out_of_range"),
    # the JSON parser itself refuses integers past 4,300 digits (Python's int/str limit)
    "feature an integer of 5,000 digits": (b'{"customer_id":"c","event_time":%d,"features":{"a":1%s,"b":1}}'
                                           % (NOW_MS, b"0" * 5000), "not_json"),
    "feature 1e400": (b'{"customer_id":"c","event_time":%d,"features":{"a":1e400,"b":1}}' % NOW_MS,
                      "non_finite"),
    "garbage just under 1 MB": (b"\x00\xff" * 499_000, "too_large"),
    "a valid event padded to 990 KB": (event(pad="p" * 990_000), "too_large"),
    "deeply nested JSON": (b"[" * 10_000, "not_json"),
    "invalid UTF-8": (b'{"customer_id":"\xff"}', "not_json"),
    "a tombstone": (None, "not_json"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_message_becomes_one_bounded_dead_letter_and_its_neighbours_are_scored(name: str) -> None:
    value, reason = HOSTILE[name]
    reasons = assert_one_record_each([event(), value, event(customer_id="c-2")])
    assert reasons == [reason]


def test_a_dead_letter_of_a_huge_message_keeps_a_prefix_and_the_original_size_and_hash() -> None:
    huge = b"x" * 999_000
    _, dead, _ = score([huge])
    headers = dict(dead[0].headers)
    assert headers["dlq.original.value.bytes"] == b"999000"
    assert len(headers["dlq.original.value.sha256"] or b"") == 64
    assert dead[0].value is not None and huge.startswith(dead[0].value) and len(dead[0].value) > 10_000


def test_a_small_dead_letter_keeps_the_original_key_and_bytes_unchanged() -> None:
    _, dead, _ = score([b"garbage"])
    assert (dead[0].key, dead[0].value) == (b"k", b"garbage")
    assert "dlq.truncated" not in dict(dead[0].headers)


def test_huge_or_numerous_original_headers_are_bounded_in_the_dead_letter() -> None:
    msg = Msg(b"garbage", _headers=[(f"h{i}", b"v" * 4096) for i in range(200)])
    batch = score_batch([msg], SMALL_MODEL, SMALL_RULES, NOW_MS)
    record = batch.dead_letters[0]
    assert record_bytes(record) <= MAX_RECORD
    assert int(dict(record.headers)["dlq.headers.dropped"] or 0) > 150


def test_an_exception_while_scoring_one_message_dead_letters_only_that_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import consumer.scoring as scoring

    real = scoring.output_values

    def explode_for_boom(events, *args):  # type: ignore[no-untyped-def]
        if any(ev.customer_id == "boom" for ev in events):
            raise ZeroDivisionError("injected")
        return real(events, *args)

    monkeypatch.setattr(scoring, "output_values", explode_for_boom)
    outputs, dead, reasons = score([event(), event(customer_id="boom"), event(customer_id="c-3")])
    assert [json.loads(r.value or b"")["customer_id"] for r in outputs] == ["c-1", "c-3"]
    assert reasons == ["internal_error"]
    assert dict(dead[0].headers)["dlq.error"] == b"ZeroDivisionError"


def test_a_model_that_gives_a_non_finite_distance_dead_letters_instead_of_writing_nan() -> None:
    # a feature at the edge of its bounds squared overflows: the output would say "distance": NaN
    wide = ScoringRules(InputContract(FEATURES, {f: (-1e300, 1e300) for f in FEATURES}), "out", "dlq",
                        MAX_RECORD)
    batch = score_batch([Msg(event(features={"a": 1e300, "b": 1e300}))], SMALL_MODEL, wide, NOW_MS)
    assert batch.reasons == ("internal_error",) and not batch.outputs


def test_the_trainer_window_decodes_with_the_same_contract_and_never_raises() -> None:
    contract = SMALL_RULES.contract
    for value, _ in HOSTILE.values():
        decoded = contract.decode(value, now_ms=NOW_MS)
        assert hasattr(decoded, "reason")


def test_a_far_future_event_never_reaches_the_customer_state() -> None:
    outputs, _, _ = score([event(event_time="9999-12-31T23:59:59Z")])
    assert outputs == []


# --- bundle validation -----------------------------------------------------------------------

@pytest.mark.parametrize(
    "poison",
    [
        {"quality": {**small_bundle()["quality"], "shares": [1.0]}},
        {"quality": {**small_bundle()["quality"], "sizes": [1, 1, 1]}},
        {"features": {**small_bundle()["features"], "vocabulary": {"channel": ["app", "web"]}}},
        {"features": {**small_bundle()["features"], "categorical_weight": 1e308}},
        {"features": {**small_bundle()["features"], "scale": [5e-324, 1.0]}},
        {"features": {**small_bundle()["features"], "center": [1e200, 0.0]}},
        {"created_at": "2026-11-29T10:00:00"},
        {"centroids": [[1e200, 0, 1, 0], [5, 5, 0, 1]]},
        {"segment_names": ["x", "y" * 1000]},
        {"segment_ids": [-1, 1]},
        {"features": clipped_bundle(clip_low=[1.0, 0.0], clip_high=[0.0, 1.0])["features"]},
        {"features": clipped_bundle(clip_low=None)["features"]},
        {"features": clipped_bundle(clip_high=[1.0])["features"]},
        {"features": clipped_bundle(clip_low=[1e300, 1e300], clip_high=[1e300, 1e300])["features"]},
    ],
    ids=["shares", "sizes", "no-other", "weight", "subnormal-scale", "huge-center", "naive-time",
         "huge-centroid", "long-name", "negative-id", "reversed-clip", "one-sided-clip",
         "short-clip", "huge-clip"],
)
def test_a_bundle_that_would_break_consumers_is_refused(poison: dict[str, Any]) -> None:
    with pytest.raises(BundleError, match="invalid bundle"):
        ModelBundle.from_json(json.dumps(small_bundle(**poison)))


NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(min_value=-(10**400), max_value=10**400),
    st.sampled_from([0, -1, 5e-324, 1e-300, 1e300, 2**63]),
)


def _mutations() -> st.SearchStrategy[tuple[list[str | int], object]]:
    paths: list[list[str | int]] = [
        ["centroids", 0, 0], ["centroids", 1, 3], ["features", "scale", 0], ["features", "center", 1],
        ["features", "categorical_weight"], ["quality", "shares", 0], ["segment_ids", 0], ["version"],
        ["features", "clip_low", 0], ["features", "clip_high", 1],
    ]
    return st.tuples(st.sampled_from(paths), NUMBERS)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(mutations=st.lists(_mutations(), min_size=1, max_size=4))
def test_a_mutated_bundle_is_refused_or_scores_every_event_to_a_finite_output(
    mutations: list[tuple[list[str | int], object]],
) -> None:
    raw = clipped_bundle()
    for path, number in mutations:
        node: Any = raw
        for step in path[:-1]:
            node = node[step]
        node[path[-1]] = number
    try:
        text = json.dumps(raw)
    except (ValueError, OverflowError):
        return
    try:
        bundle = ModelBundle.from_json(text)
    except BundleError:
        return
    model = ActiveModel.of(bundle)
    values = [event(features={"a": a, "b": -a}) for a in (0.0, 1.0, -1e12, 1e12)]
    batch = score_batch([Msg(v, _offset=i) for i, v in enumerate(values)], model, SMALL_RULES, NOW_MS)
    assert len(batch.outputs) + len(batch.dead_letters) == len(values)
    assert len(batch.outputs) == len(values)  # a valid bundle scores every valid event
    for record in batch.outputs:
        strict_json(record.value or b"")


# --- property-based fuzzing: bytes in, records out ------------------------------------------

JSON_LEAVES = st.one_of(
    st.none(), st.booleans(), st.text(max_size=40), NUMBERS,
    st.integers(min_value=-(2**70), max_value=2**70),
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
TIMES = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=NOW_MS - 10**10, max_value=NOW_MS + 10**7),
    st.datetimes().map(lambda d: d.isoformat() + "Z"),
    st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat()),
    JSON_VALUES,
)
TEXT = st.one_of(st.text(max_size=30), st.text(min_size=250, max_size=400), st.just(""))
EVENTS = st.fixed_dictionaries(
    {},
    optional={
        "customer_id": st.one_of(TEXT, JSON_VALUES),
        "event_time": TIMES,
        "event_id": st.one_of(TEXT, st.none(), JSON_VALUES),
        "features": st.one_of(
            st.fixed_dictionaries({"a": NUMBERS, "b": NUMBERS}),
            st.dictionaries(st.sampled_from(["a", "b", "c"]), JSON_LEAVES),
        ),
        "attributes": st.one_of(st.dictionaries(TEXT, TEXT, max_size=4), JSON_VALUES),
        "extra": JSON_VALUES,
    },
)


def _encode(doc: object) -> bytes:
    try:
        return json.dumps(doc).encode()
    except (ValueError, OverflowError):  # integers past Python's str() digit limit
        return b"{}"


MESSAGES = st.one_of(
    EVENTS.map(_encode),
    st.binary(max_size=200),
    JSON_VALUES.map(_encode),
    st.builds(lambda n: event(pad="p" * n), st.integers(min_value=0, max_value=200_000)),
    st.none(),
)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(values=st.lists(MESSAGES, min_size=1, max_size=8))
def test_fuzz_every_message_gives_exactly_one_bounded_record(values: list[bytes | None]) -> None:
    assert_one_record_each([event(), *values])


def test_a_high_cardinality_attribute_cannot_widen_the_model_without_bound() -> None:
    from segmentation.events import CustomerEvent
    from segmentation.features import FeatureConfig, fit_spec
    from segmentation.settings import Settings

    s = Settings()
    events = [CustomerEvent(customer_id=f"c{i}", event_time=0, features={"a": i, "b": 1},
                            attributes={"channel": f"v{i % 2000}" if i % 3 else "app"})
              for i in range(12_000)]
    spec = fit_spec(events, FeatureConfig(FEATURES, ("channel",), vocabulary_min_count=s.vocabulary_min_count,
                                          vocabulary_max=s.vocabulary_max))
    assert len(spec.columns) <= len(FEATURES) + s.vocabulary_max + 1
    assert spec.vocabulary["channel"][0] == "app"


def test_a_valid_event_with_800_kb_of_headers_counts_them_towards_its_size() -> None:
    msg = Msg(event(), _headers=[(f"h{i}", b"v" * 4096) for i in range(200)])
    batch = score_batch([msg], SMALL_MODEL, SMALL_RULES, NOW_MS)
    assert batch.reasons == ("too_large",) and not batch.outputs
    assert record_bytes(batch.dead_letters[0]) <= MAX_RECORD


def test_one_absurd_but_valid_event_cannot_drag_an_online_centre() -> None:
    from consumer.online import OnlineKMeans

    batch = score_batch([Msg(event(), _offset=0), Msg(event(features={"a": 1e9, "b": 1}), _offset=1)],
                        SMALL_MODEL, SMALL_RULES, NOW_MS)
    assert len(batch.outputs) == 2  # scored and delivered like any event
    online = OnlineKMeans(SMALL_MODEL.centroids, np.array([0.5, 0.5]), half_life_events=10)
    assert online.learn(batch.encoded, batch.nearest) == 1
    assert np.abs(online.centroids - SMALL_MODEL.centroids).max() < 1.0


# --- one customer's events in one place, one unit per JSON type -------------------------------

def dlq_detail(letter: OutRecord) -> str:
    detail = dict(letter.headers)["dlq.detail"] or b""
    return detail if isinstance(detail, str) else detail.decode()


@pytest.mark.parametrize("key", [None, b"", b"a", b"C-1", b"c-1 ", b"\xff", b"k" * 5000],
                         ids=["none", "empty", "other", "case", "space", "not-utf8", "long"])
def test_a_message_not_keyed_by_its_customer_id_is_a_key_mismatch_dead_letter(key: bytes | None) -> None:
    value = event(customer_id="c-1")
    messages = [Msg(event(customer_id="c-0"), 0), Msg(value, 1, key), Msg(event(customer_id="c-2"), 2)]
    batch = score_batch(messages, SMALL_MODEL, SMALL_RULES, NOW_MS)
    assert batch.reasons == ("key_mismatch",) and len(batch.outputs) == 2
    letter = batch.dead_letters[0]
    assert (letter.key, letter.value) == (key, value)  # the original key and bytes, unchanged
    detail = dlq_detail(letter)
    assert "'c-1'" in detail and ("no key" in detail if key is None else "the key" in detail)
    assert len(detail) < 200


def test_the_key_check_is_on_by_default_and_follows_its_setting() -> None:
    from segmentation.settings import Settings

    value = demo_values(1)[0]
    customer = json.loads(value)["customer_id"]
    checked, unchecked = Settings().input_contract(), Settings(require_key_match=False).input_contract()
    for contract in (checked, unchecked):
        assert not isinstance(contract.decode_message(Msg(value, 0), NOW_MS), Rejection)
    assert checked.decode_message(Msg(value, 0, b"c-x"), NOW_MS) == Rejection(
        "key_mismatch", f"the key 'c-x' is not the customer_id '{customer}'")
    assert not isinstance(unchecked.decode_message(Msg(value, 0, b"c-x"), NOW_MS), Rejection)


def test_the_batch_fast_path_refuses_the_same_keys_as_one_message_at_a_time() -> None:
    messages = [Msg(event(customer_id=f"c-{i}"), i, key) for i, key in
                enumerate([b"c-0", None, b"c-9", b"c-3", b"", b"c-5"])]
    one_by_one = [SMALL_RULES.contract.decode_message(m, NOW_MS) for m in messages]
    assert SMALL_RULES.contract.decode_batch(messages, NOW_MS) == one_by_one
    assert [getattr(d, "reason", "event") for d in one_by_one] == [
        "event", "key_mismatch", "key_mismatch", "event", "key_mismatch", "event"]


def _outcome(event_time: object) -> str:
    """What becomes of an event with this ``event_time``: its output's time, or its dead letter's
    reason."""
    outputs, _, reasons = score([event(event_time=event_time)])
    return json.loads(outputs[0].value or b"")["event_time"] if outputs else reasons[0]


@pytest.mark.parametrize("ms", [NOW_MS, 1_764_410_100, 1.7644101e12])
def test_an_event_time_number_is_epoch_milliseconds_whether_integer_or_float(ms: float) -> None:
    # the float was once read as seconds (scored in 2025) while the same integer was
    # milliseconds (1970, dead-lettered); JSON Schema calls them the same number
    assert _outcome(int(ms)) == _outcome(float(ms))
    assert _outcome(NOW_MS) == _outcome(float(NOW_MS)) == "2025-11-29T09:55:00.000Z"


@pytest.mark.parametrize("when", ["1764410100", str(NOW_MS), "1764410100.5", "2025-11-29 09:55:00Z",
                                  "2025-11-29T09:55Z", "2025-11-29T09:55:00", NOW_MS + 0.5, float("nan")])
def test_a_numeric_string_or_a_fractional_millisecond_event_time_is_refused(when: object) -> None:
    assert _outcome(when) == "bad_event_time"
    _, dead, _ = score([event(event_time=when)])
    detail = dlq_detail(dead[0])
    assert detail.startswith("event_time: ") and ("RFC 3339" in detail or "milliseconds" in detail)


def test_the_schema_says_what_the_code_does_about_event_time() -> None:
    from segmentation.events import RFC3339_PATTERN, json_schema

    string, number = json_schema()["properties"]["event_time"]["anyOf"]
    assert number == {"type": "integer"}  # 1764410100000.0 is an integer to JSON Schema: milliseconds
    assert string == {"type": "string", "format": "date-time", "pattern": RFC3339_PATTERN}
    for text in ["2025-11-29T09:55:00Z", "2025-11-29t09:55:00.5+01:00", "1764410100", "2025-11-29 09:55:00Z",
                 "2025-11-29T09:55:00Z\n", "２０２５-11-29T09:55:00Z"]:
        # an ECMA-262 "$" never matches before a final newline: fullmatch, not search, says the same
        by_schema = re.fullmatch(string["pattern"], text) is not None
        assert by_schema == (_outcome(text) != "bad_event_time"), text
