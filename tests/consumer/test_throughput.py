"""The consumer's fast path computes exactly what the plain, one-message-at-a-time path
computes: the same events or rejections, the same segments and distances, the same output bytes.
No timing here: performance is measured by ``make bench`` only."""

from __future__ import annotations

import itertools
import json
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram
from pydantic_core import to_json

from consumer.online import OnlineKMeans
from consumer.scoring import (
    event_times_iso,
    json_number,
    json_string,
    output_value,
    output_values,
    score_batch,
)
from segmentation.cluster_metrics import nearest_two
from segmentation.events import CustomerEvent, DecodedEvent, Event, Rejection, event_time_iso, plain_event_ms
from segmentation.metrics import BatchHistogram
from segmentation.settings import DEFAULT_FEATURES
from tests.support.messages import (
    DEMO_CONTRACT,
    DEMO_MODEL,
    DEMO_RULES,
    FUZZ_EXAMPLES,
    NOW_MS,
    Msg,
    demo_values,
)
from trainer.__main__ import train_config


def hostile(values: list[bytes]) -> list[bytes | None]:
    """The demo's events with every kind of bad input mixed in, including values that are valid
    only when compared exactly (integers past 2**53, bounds, times at the edges)."""
    base = json.loads(values[0])
    bad: list[bytes | None] = [None, b"garbage", b"[1]", b'{"customer_id":"c"}']
    for name, value in [("recency_days", 1e12), ("recency_days", 10**12 + 1), ("frequency_90d", 2**53 + 1),
                        ("monetary_90d", float("nan")), ("sessions_30d", "7"), ("tenure_days", -1e12)]:
        changed = json.loads(json.dumps(base))
        changed["features"][name] = value
        bad.append(json.dumps(changed).encode())
    for event_time in [NOW_MS + 3600_000, NOW_MS + 3600_001, 10**17, "2026-11-29T10:15:00+23:59",
                       NOW_MS - 10 * 365 * 86400_000, "9999-12-31T23:59:59-23:59"]:
        bad.append(json.dumps({**base, "event_time": event_time}).encode())
    bad.append(json.dumps({**base, "customer_id": "c" * 257}).encode())
    bad.append(json.dumps({**base, "customer_id": 'q"uo\\te\u2028é'}).encode())
    bad.append(json.dumps({**base, "event_id": None}).encode())
    mixed: list[bytes | None] = list(values)
    for i, b in enumerate(bad):
        mixed.insert((i * 7) % len(mixed), b)
    return mixed


def plain_output(event: Event, segment: int, distance: float, scored_at: str) -> bytes:
    """The output contract as it was built before the fast path: a dict through ``to_json``."""
    return to_json({
        "customer_id": event.customer_id, "event_id": event.event_id,
        "event_time": event_time_iso(event.event_ms), "segment_id": DEMO_MODEL.bundle.segment_ids[segment],
        "segment": DEMO_MODEL.bundle.segment_names[segment], "distance": round(distance, 6),
        "outlier": False, "model_version": DEMO_MODEL.version, "scored_at": scored_at,
    })


def test_the_fast_path_gives_the_same_assignments_and_bytes_as_one_message_at_a_time() -> None:
    messages = [Msg(v, i) for i, v in enumerate(hostile(demo_values(1500)))]
    batch = score_batch(messages, DEMO_MODEL, DEMO_RULES, NOW_MS)

    expected: dict[int, bytes | str] = {}
    for msg in messages:
        decoded = DEMO_CONTRACT.decode_message(msg, NOW_MS)
        if isinstance(decoded, Rejection):
            expected[msg.offset()] = decoded.reason
            continue
        x, _ = DEMO_MODEL.bundle.features.encode([decoded])  # one event at a time
        idx, d1, _ = nearest_two(x, DEMO_MODEL.centroids)
        expected[msg.offset()] = plain_output(decoded, int(idx[0]), float(d1[0]), event_time_iso(NOW_MS))

    got: dict[int, bytes | str] = {}
    for record, reason in zip(batch.dead_letters, batch.reasons, strict=True):
        assert record.source is not None
        got[int(record.source.offset() or 0)] = reason
    for record in batch.outputs:
        assert record.source is not None and record.value is not None
        got[int(record.source.offset() or 0)] = record.value
    assert got == expected
    assert len(batch.dead_letters) >= 10 and len(batch.outputs) > 1400  # both paths exercised


def test_the_fast_path_gives_the_same_encoding_as_encoding_one_by_one() -> None:
    messages = [Msg(v, i) for i, v in enumerate(demo_values(600))]
    batch = score_batch(messages, DEMO_MODEL, DEMO_RULES, NOW_MS)
    one_by_one = np.vstack([
        DEMO_MODEL.bundle.features.encode([CustomerEvent.model_validate_json(m.value() or b"")])[0]
        for m in messages
    ])
    np.testing.assert_allclose(batch.encoded, one_by_one, rtol=0, atol=1e-12)
    assert batch.indices.tolist() == nearest_two(one_by_one, DEMO_MODEL.centroids)[0].tolist()


# event times in and around the RFC 3339 forms: the fast path converts only the plain ones itself
RFC3339_LIKE = st.builds(
    lambda date, sep, time, fraction, offset: f"{date}{sep}{time}{fraction}{offset}",
    st.sampled_from(["2026-11-29", "2024-02-29", "2025-02-29", "0001-01-01", "9999-12-31", "2026-13-01"]),
    st.sampled_from(["T", "t", " "]),
    st.sampled_from(["10:15:00", "23:59:60", "24:00:00", "00:00:00", "10:15"]),
    st.sampled_from(["", ".5", ".123456", ".1234567", "."]),
    st.sampled_from(["Z", "z", "+00:00", "-23:59", "+24:00", "+05:30", "", "+0530", "-00:00"]),
)
CANONICAL_TIME = st.builds(  # the form our producers write, with digits in and out of range
    lambda ms, seconds, millis: f"{event_time_iso(ms)[:17]}{seconds}.{millis}Z",
    st.integers(min_value=-62_135_596_800_000, max_value=253_402_300_799_999),
    st.sampled_from(["00", "07", "59", "60", "99", "+1", " 1", "1_", "\u0663\u0663"]),
    st.sampled_from(["000", "149", "999", "1_0", "+12", "\u0663\u0663\u0663"]),
)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(CANONICAL_TIME)
def test_the_fast_event_time_is_the_exact_paths(text: str) -> None:
    try:
        exact: int | None = CustomerEvent(customer_id="c", event_time=text, features={}).event_ms
    except ValueError:
        exact = None
    fast = plain_event_ms(text)
    assert fast is None or fast == exact


def test_event_times_written_by_our_producers_take_the_fast_path() -> None:
    for ms in (0, -1, 1_796_571_724_149, 4_102_444_799_999, -62_135_596_800_000):
        assert plain_event_ms(event_time_iso(ms)) == ms


NUMBER = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e12, -1e12, 1e12 + 1, 10**12, 10**12 + 1, 2**53, 2**53 + 1, 0, -0.0, True, "1"]),
)
EVENT = st.fixed_dictionaries(
    {
        "customer_id": st.one_of(st.text(max_size=300), st.sampled_from(["\ud800", "c-\udfff", "", "é"])),
        "event_time": st.one_of(st.integers(min_value=-(2**64), max_value=2**64),
                                st.sampled_from([NOW_MS, NOW_MS + 3600_000, NOW_MS + 3600_001, float(NOW_MS),
                                                 NOW_MS + 0.5, True, "1764410100000"]),
                                RFC3339_LIKE),
        "features": st.fixed_dictionaries({f: NUMBER for f in DEFAULT_FEATURES}),
    },
    optional={"event_id": st.one_of(st.none(), st.text(max_size=300)),
              "attributes": st.dictionaries(st.text(max_size=300), st.text(max_size=300), max_size=3)},
)


def test_a_large_value_with_an_escape_is_decoded_exactly_beside_small_plain_ones() -> None:
    # values above the size scanned per batch are scanned one by one: a lone surrogate escaped
    # in a large value still goes to the exact path (which refuses it)
    plain = demo_values(3)
    event = json.loads(plain[0])
    event["attributes"] = {"note": "x" * 5000 + "\ud800"}
    large = json.dumps(event).encode()
    assert b"\\ud800" in large and len(large) > 4096
    messages = [Msg(v, i) for i, v in enumerate([plain[1], large, plain[2]])]
    decoded = DEMO_CONTRACT.decode_batch(messages, NOW_MS)
    assert decoded == [DEMO_CONTRACT.decode_message(m, NOW_MS) for m in messages]
    assert isinstance(decoded[1], Rejection) and not isinstance(decoded[0], Rejection)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(EVENT, min_size=1, max_size=8))
def test_decoding_a_batch_is_decoding_each_message(events: list[dict[str, Any]]) -> None:
    values = [json.dumps(e, allow_nan=True).encode() for e in events]
    messages = [Msg(v, i) for i, v in enumerate(values)]
    one_by_one = [DEMO_CONTRACT.decode_message(m, NOW_MS) for m in messages]
    assert DEMO_CONTRACT.decode_batch(messages, NOW_MS) == one_by_one


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(st.lists(st.integers(min_value=-62_135_596_800_000, max_value=253_402_300_799_999), max_size=20))
def test_event_times_of_a_batch_are_formatted_as_one_by_one(times: list[int]) -> None:
    edges = [0, -1, 1, 2**32 * 1000 - 1, 2**32 * 1000, -(2**32) * 1000, 253_402_300_799_999]
    assert event_times_iso(times + edges) == [event_time_iso(t) for t in times + edges]


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(st.text(), st.floats(min_value=0, allow_nan=False, allow_infinity=False))
def test_strings_and_distances_serialise_as_to_json(text: str, distance: float) -> None:
    assert json_string(text) == to_json(text).decode()
    rounded = round(distance, 6)
    assert json_number(rounded) == to_json(rounded).decode()


def test_an_output_value_is_the_dict_of_its_fields_through_to_json() -> None:
    event = CustomerEvent(customer_id='c"\u2028\x7f', event_time=NOW_MS, event_id=None, features={})
    for distance, outlier in itertools.product((0.0, 1e-7, 0.4213, 123.4567891, 1e15, 1e300), (False, True)):
        scored_at = event_time_iso(NOW_MS)
        name = DEMO_MODEL.bundle.segment_names[1]
        assert output_value(event, NOW_MS, 1, name, distance, DEMO_MODEL.version, scored_at,
                            outlier=outlier) == to_json({
            "customer_id": event.customer_id, "event_id": None, "event_time": event_time_iso(NOW_MS),
            "segment_id": 1, "segment": DEMO_MODEL.bundle.segment_names[1], "distance": round(distance, 6),
            "outlier": outlier, "model_version": DEMO_MODEL.version, "scored_at": scored_at,
        })


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(st.lists(st.tuples(st.text(min_size=1), st.none() | st.text(),
                          st.floats(min_value=0, max_value=1e300, allow_nan=False), st.booleans(),
                          st.integers(-(2**40), 2**45)), min_size=1, max_size=20),
       st.sampled_from([None, float("inf"), float("nan")]))
def test_a_batch_of_output_values_is_each_events_output_value(
    rows: list[tuple[str, str | None, float, bool, int]], poison: float | None,
) -> None:
    events = [DecodedEvent(c, ms, {}, {}, e) for c, e, _, _, ms in rows]
    event_ms = [ms for *_, ms in rows]
    indices = np.arange(len(rows)) % len(DEMO_MODEL.bundle.segment_ids)
    distances = np.array([d for _, _, d, _, _ in rows])
    outliers = np.array([o for _, _, _, o, _ in rows])
    if poison is not None:
        distances[-1] = poison
    ids, names = DEMO_MODEL.bundle.segment_ids, DEMO_MODEL.bundle.segment_names

    def each() -> list[bytes]:
        return [output_value(ev, ms, ids[i], names[i], d, DEMO_MODEL.version, "T", outlier=o)
                for ev, ms, i, d, o in zip(events, event_ms, indices.tolist(), distances.tolist(),
                                           outliers.tolist(), strict=True)]

    if poison is None:
        assert output_values(events, event_ms, indices, distances, DEMO_MODEL, "T", outliers) == each()
    else:  # a non-finite distance raises as it does event by event (the batch is then split)
        with pytest.raises(ValueError, match="non-finite distance"):
            output_values(events, event_ms, indices, distances, DEMO_MODEL, "T", outliers)


def test_a_batch_of_observations_fills_the_histogram_as_one_by_one() -> None:
    values = np.concatenate([np.random.default_rng(1).exponential(0.5, 1000), [0.0, 0.005, 1e9]])
    one = Histogram("lag", "l", buckets=(0.005, 0.1, 1.0, 10.0), registry=CollectorRegistry())
    many = BatchHistogram("lag", "l", (0.005, 0.1, 1.0, 10.0), CollectorRegistry())
    for v in values.tolist():
        one.observe(v)
    many.observe_all(values)
    samples = [[(s.name, s.labels, s.value) for s in next(iter(h.collect())).samples
                if s.name != "lag_created"] for h in (one, many)]
    assert [s[:2] for s in samples[0]] == [s[:2] for s in samples[1]]
    np.testing.assert_allclose([s[2] for s in samples[0]], [s[2] for s in samples[1]], rtol=1e-12)


@pytest.mark.parametrize("half_life", [5000.0, 100.0, None])
def test_the_online_step_is_the_mini_batch_k_means_step_with_decayed_counts(half_life: float | None) -> None:
    """The textbook step (Sculley 2010, as scikit-learn's ``_mini_batch_step`` does it) with the
    absorbed weights decayed before each batch, written out in numpy: the public-API weighting
    of ``OnlineKMeans`` gives the same centres and counts (a half-life of 100 events crosses
    ``RESCALE_AT`` several times)."""
    rng = np.random.default_rng(5)
    start = np.asarray(DEMO_MODEL.centroids)
    ours = OnlineKMeans(start, np.full(5, 0.2), half_life_events=half_life)
    centres, counts = start.copy(), ours.counts.copy()
    for _ in range(80 if half_life == 100.0 else 40):
        x = start[rng.integers(0, 5, 300)] + rng.normal(0.3, 1.0, (300, start.shape[1]))
        ours.learn(x)
        if half_life is not None:
            counts *= 0.5 ** (300 / half_life)
        labels = np.argmin(((x[:, None, :] - centres[None]) ** 2).sum(axis=2), axis=1)
        for j in range(5):
            rows = x[labels == j]
            if rows.shape[0]:
                centres[j] = (centres[j] * counts[j] + rows.sum(axis=0)) / (counts[j] + rows.shape[0])
                counts[j] += rows.shape[0]
    np.testing.assert_allclose(ours.centroids, centres, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(ours.counts, counts, rtol=1e-9, atol=1e-300)
    assert np.abs(ours.centroids - start).max() > 0.1  # it did move


@pytest.mark.parametrize("size", [1, 7, 500])
def test_batch_size_does_not_change_assignments(size: int) -> None:
    messages = [Msg(v, i) for i, v in enumerate(demo_values(500))]
    whole = score_batch(messages, DEMO_MODEL, DEMO_RULES, NOW_MS)
    parts = [score_batch(messages[i:i + size], DEMO_MODEL, DEMO_RULES, NOW_MS) for i in range(0, 500, size)]
    assert [r.value for p in parts for r in p.outputs] == [r.value for r in whole.outputs]


# --- overlapped delivery, against the real broker and Redis -------------------------------------
@pytest.mark.integration
def test_a_batch_s_offsets_are_committed_only_once_its_outputs_are_acknowledged_and_its_customers_written(
    settings_factory: Any,
) -> None:
    from confluent_kafka import Consumer

    from consumer.partitions import commit_stored
    from consumer.service import build_delivery, build_loop
    from segmentation.kafka import consumer_config
    from segmentation.metrics import ConsumerMetrics, TrainerMetrics
    from segmentation.store import CustomerStore, ModelStore, connect
    from tests.consumer.test_consumer import committed
    from tests.support.stack import customers, produce_events, read_outputs
    from trainer.pipeline import train_once

    s = settings_factory(batch_size=50)
    sent = produce_events(s, customers(400))
    store = ModelStore(connect(s), s.redis_prefix)
    assert train_once(train_config(s), store, TrainerMetrics()).result == "published"
    consumer = Consumer(consumer_config(s, exactly_once=False))
    loop = build_loop(s, consumer, build_delivery(s, consumer), store, CustomerStore.for_settings(s),
                      ConsumerMetrics())
    loop.subscribe()
    try:
        for _ in range(200):  # joining the group, then the first batch is sent
            loop.step()
            if loop.checkpoint.in_flight is not None:
                break
        flight = loop.checkpoint.in_flight
        assert flight is not None
        first: dict[int, int] = {}
        for m in flight.batch.messages:
            p, o = int(m.partition() or 0), int(m.offset() or 0)
            first[p] = min(first.get(p, 1 << 62), o)
        commit_stored(loop.consumer)  # what a commit now would write
        assert all(committed(s).get(p, 0) <= offset for p, offset in first.items())

        while loop.checkpoint.in_flight is flight:  # the next step commits it
            loop.step()
        commit_stored(loop.consumer)
        after = committed(s)
        for m in flight.batch.messages:
            assert after[int(m.partition() or 0)] > int(m.offset() or 0)
        ids = {json.loads(m.value() or b"")["event_id"] for m in flight.batch.messages}
        outputs = read_outputs(s, ids, timeout_s=30)  # acknowledged, hence readable
        written = CustomerStore.for_settings(s)
        assert all(written.get(outputs[i]["customer_id"]) for i in ids)
        assert ids <= set(sent)
    finally:
        loop.close()
