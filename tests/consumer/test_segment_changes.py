"""Segment-change events: what is recorded, with which cause, and that restarts, rebalances and
kills never invent a change (``consumer.changes``).

Fast tests drive ``SegmentChanges.detect`` with hand-made batches; the others run the consumer
against the real broker and Redis and read the changes topic as a subscriber would."""

from __future__ import annotations

import json
import signal
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from confluent_kafka import Producer
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.changes import Changes, ChangesUnavailable, Recorded, SegmentChanges, cause_of, change_value
from consumer.model import ActiveModel
from consumer.scoring import score_batch
from consumer.service import build_changes
from demo.generator import another_profile
from segmentation.bundle import ModelBundle, SegmentDiff
from segmentation.events import CustomerEvent
from segmentation.kafka import ReadIncomplete, TopicReader, producer_config, read_to_end
from segmentation.metrics import ConsumerMetrics
from segmentation.settings import Settings
from tests.support.fixed import changes_for, fixed_events, segments, send, trained
from tests.support.messages import FUZZ_EXAMPLES, NOW_MS, SMALL_MODEL, SMALL_RULES, Msg, event, small_bundle
from tests.support.stack import (
    active_version,
    customers,
    make_settings,
    produce_raw,
    read_outputs,
    read_topic,
    running_consumer,
    sample,
    start_service,
    wait_until,
)
from trainer.__main__ import model_topic
from trainer.pipeline import publish


# --- fast: detection against a given state --------------------------------------------------
def changes_of(settings: Settings | None = None,
               model_of: Callable[[int], ActiveModel | None] = lambda v: None) -> SegmentChanges:
    changes = build_changes(settings or make_settings(), ConsumerMetrics(), model_of)
    changes.state[0] = {}  # partition 0 held: nothing recorded yet, no topic to read
    return changes


def detect(
    changes: SegmentChanges, values: Sequence[bytes], model: ActiveModel = SMALL_MODEL,
) -> list[dict[str, object]]:
    batch = score_batch([Msg(v, i) for i, v in enumerate(values)], model, SMALL_RULES, NOW_MS)
    found = changes.detect(batch, model, "now")
    assert len(found.records) == len(found.causes)
    return [json.loads(r.value or b"") for r in found.records]


def at(a: float, ms: int = NOW_MS, customer: str = "c-1") -> bytes:
    return event(customer_id=customer, event_time=ms, features={"a": a, "b": a})


def test_a_first_segment_is_recorded_as_initial_and_the_same_segment_again_is_no_change() -> None:
    changes = changes_of()
    records = detect(changes, [at(0.1), at(0.2, NOW_MS + 1), at(0.3, NOW_MS + 2)])
    assert [(r["cause"], r["from_segment_id"], r["to_segment_id"]) for r in records] == [("initial", None, 0)]
    assert changes.state[0]["c-1"] == Recorded(0, "x", 1, NOW_MS + 2)


def test_a_customer_whose_features_move_changes_with_cause_behaviour_once() -> None:
    changes = changes_of()
    detect(changes, [at(0.1)])
    records = detect(changes, [at(5.0, NOW_MS + 1), at(5.1, NOW_MS + 2), at(0.0, NOW_MS + 3)])
    assert [(r["cause"], r["from_segment_id"], r["to_segment_id"]) for r in records] == [
        ("behaviour", 0, 1), ("behaviour", 1, 0)]
    assert records[0]["from_segment"] == "x" and records[0]["to_segment"] == "y"
    assert records[0]["customer_id"] == "c-1" and records[0]["event_id"] == "e-1"


def test_an_event_older_than_the_newest_seen_changes_nothing() -> None:
    changes = changes_of()
    detect(changes, [at(0.1, NOW_MS + 10)])
    assert detect(changes, [at(5.0, NOW_MS)]) == []
    assert changes.metrics.registry.get_sample_value("segment_change_late_events_total") == 1.0
    assert changes.state[0]["c-1"].segment_id == 0


def test_customers_are_tracked_apart() -> None:
    changes = changes_of()
    records = detect(changes, [at(0.1, customer="a"), at(5.0, customer="b"), at(5.0, NOW_MS + 1, "a")])
    assert [(r["customer_id"], r["cause"]) for r in records] == [
        ("a", "initial"), ("b", "initial"), ("a", "behaviour")]


def moved_model(version: int, centroids: list[list[float]]) -> ActiveModel:
    return ActiveModel.of(ModelBundle.model_validate(small_bundle(version=version, centroids=centroids)))


def test_without_a_changes_topic_nothing_is_recorded_and_nothing_is_read() -> None:
    changes = build_changes(make_settings(changes_topic=None), ConsumerMetrics(), lambda v: None)
    messages = [Msg(at(0.1), 0)]
    batch = score_batch(messages, SMALL_MODEL, SMALL_RULES, NOW_MS)
    assert changes.record(messages, batch, SMALL_MODEL) == Changes() and changes.state == {}


def test_a_model_that_moves_a_customer_whose_features_stayed_is_the_cause() -> None:
    v1 = SMALL_MODEL
    # v2 moves segment 0's centre next to (3, 3): a customer at (2, 2) now belongs to segment 1
    v2 = moved_model(2, [[-3, -3, 1, 0], [5, 5, 0, 1]])
    changes = changes_of(model_of={1: v1, 2: v2}.get)
    detect(changes, [at(2.0)], v1)
    records = detect(changes, [at(2.0, NOW_MS + 1)], v2)
    assert [(r["cause"], r["from_model_version"], r["to_model_version"]) for r in records] == [
        ("model", 1, 2)]


def test_a_customer_who_moved_under_a_new_model_is_a_behaviour_change() -> None:
    v2 = moved_model(2, [[0.5, 0.5, 1, 0], [5, 5, 0, 1]])
    changes = changes_of(model_of={1: SMALL_MODEL, 2: v2}.get)
    detect(changes, [at(0.1)], SMALL_MODEL)
    assert [r["cause"] for r in detect(changes, [at(6.0, NOW_MS + 1)], v2)] == ["behaviour"]


def test_the_cause_is_unknown_when_the_recording_model_cannot_be_loaded() -> None:
    before = Recorded(0, "x", 1, NOW_MS)
    e = CustomerEvent.model_validate_json(at(5.0))
    assert cause_of(e, before, 2, lambda v: None) == "unknown"
    assert cause_of(e, before, 1, lambda v: None) == "behaviour"


def retrained(diff: list[dict[str, object]], ids: list[int], **quality: object) -> ActiveModel:
    """v2 of the small model: the same centroids under ``ids``, with the retrain's ``diff``."""
    raw = small_bundle(version=2, segment_ids=ids, segment_names=[f"s{i}" for i in ids],
                       label_mapping={"diff": diff})
    raw["quality"] = {**raw["quality"], **quality}
    return ActiveModel.of(ModelBundle.model_validate(raw))


def test_a_model_change_into_a_split_segment_names_its_status_and_parents() -> None:
    v2 = retrained([{"segment_id": 7, "status": "split", "parents": [0], "index": 0},
                    {"segment_id": 1, "status": "kept", "parents": [1], "index": 1}], ids=[7, 1])
    changes = changes_of(model_of={1: SMALL_MODEL, 2: v2}.get)
    detect(changes, [at(0.1, customer="stays"), at(5.0, customer="kept")], SMALL_MODEL)
    records = detect(changes, [at(0.1, NOW_MS + 1, "stays"), at(5.0, NOW_MS + 1, "kept")], v2)
    assert [(r["customer_id"], r["cause"], r["to_segment_id"], r["to_status"], r["to_parents"])
            for r in records] == [("stays", "model", 7, "split", [0])]


def test_a_merge_and_a_birth_are_named_and_a_behaviour_change_into_them_is_not() -> None:
    v2 = retrained([{"segment_id": 8, "status": "merged", "parents": [0, 3], "index": 0},
                    {"segment_id": 9, "status": "born", "parents": [], "index": 1}], ids=[8, 9])
    changes = changes_of(model_of={1: SMALL_MODEL, 2: v2}.get)
    detect(changes, [at(0.1, customer="merged"), at(0.1, customer="moves")], SMALL_MODEL)
    records = detect(changes, [at(0.1, NOW_MS + 1, "merged"), at(5.0, NOW_MS + 1, "moves")], v2)
    assert [(r["cause"], r["to_status"], r["to_parents"]) for r in records] == [
        ("model", "merged", [0, 3]), ("behaviour", None, None)]
    fresh = detect(changes, [at(5.0, NOW_MS + 1, "new")], v2)  # no model moved a newcomer
    assert [(r["cause"], r["to_status"]) for r in fresh] == [("initial", None)]


def test_an_old_bundle_without_a_diff_gives_null_lineage() -> None:
    v2 = moved_model(2, [[-3, -3, 1, 0], [5, 5, 0, 1]])
    changes = changes_of(model_of={1: SMALL_MODEL, 2: v2}.get)
    detect(changes, [at(2.0)], SMALL_MODEL)
    (record,) = detect(changes, [at(2.0, NOW_MS + 1)], v2)
    assert (record["cause"], record["to_status"], record["to_parents"], record["outlier"]) == (
        "model", None, None, False)


def test_a_change_made_by_an_outlier_event_says_so() -> None:
    model = ActiveModel.of(ModelBundle.model_validate(small_bundle(quality={
        **small_bundle()["quality"], "radius_p99": [1.0, 1.0], "radius_outlier": [3.0, 3.0]})))
    changes = changes_of()
    records = detect(changes, [at(0.1, customer="a"), at(40.0, customer="b")], model)
    assert [(r["customer_id"], r["to_segment_id"], r["outlier"]) for r in records] == [
        ("a", 0, False), ("b", 1, True)]


TEXT = st.text(max_size=40) | st.sampled_from(["", "é \"q\" \\", "\x00\x1f\x7f", "c-1"])


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(customer=TEXT, event_id=st.none() | TEXT, segment=TEXT, before=st.none() | TEXT,
       status=st.none() | st.sampled_from(["split", "merged", "born", "kept"]),
       parents=st.lists(st.integers(0, 10**6), max_size=3), outlier=st.booleans(),
       cause=st.sampled_from(["initial", "behaviour", "model", "unknown"]))
def test_a_change_record_is_the_json_of_its_fields(customer: str, event_id: str | None, segment: str,
                                                   before: str | None, status: str | None,
                                                   parents: list[int], outlier: bool, cause: str) -> None:
    """``change_value`` builds its JSON as one string: it must parse to the record's fields, and
    be ``json.dumps``' bytes wherever no string needs escaping."""
    e = CustomerEvent(customer_id=customer or "c", event_time=1000, event_id=event_id, features={})
    recorded = None if before is None else Recorded(3, before, 4, 0)
    lineage = None if status is None else SegmentDiff(segment_id=7, status=status, parents=parents)
    value = change_value(e, 1000, recorded, 7, segment, 5, cause, "T", outlier, lineage)  # type: ignore[arg-type]
    named = lineage if cause == "model" else None
    fields = {
        "customer_id": e.customer_id, "event_id": event_id, "event_time": "1970-01-01T00:00:01.000Z",
        "cause": cause, "from_segment_id": 3 if recorded else None, "from_segment": before,
        "from_model_version": 4 if recorded else None, "to_segment_id": 7, "to_segment": segment,
        "to_model_version": 5, "to_status": named.status if named else None,
        "to_parents": list(named.parents) if named else None, "outlier": outlier, "changed_at": "T",
    }
    assert json.loads(value) == fields
    if all(t is None or (t.isascii() and t.isprintable()) for t in (customer, event_id, segment, before)):
        assert value == json.dumps(fields, ensure_ascii=False, separators=(",", ":")).encode()


# --- the real stack -------------------------------------------------------------------------
@pytest.mark.integration
def test_changes_across_a_restart_and_a_rebalance_are_exactly_the_true_ones(settings: Settings) -> None:
    _, model = trained(settings)
    people = customers(300, seed=11, prefix="f")
    who = {c.customer_id for c in people}
    first = fixed_events(people, "first")
    with running_consumer(settings):
        send(settings, first)
    initial = changes_for(settings, who, at_least=len(people))
    assert Counter(r["cause"] for r in initial) == {"initial": len(people)}
    assert {r["customer_id"]: r["to_segment_id"] for r in initial} == segments(model, first)

    # a restart, then a second member joining and leaving: the same features change nothing
    with running_consumer(settings):
        send(settings, fixed_events(people, "again"))
        with running_consumer(settings):
            send(settings, fixed_events(people, "joined"))
        send(settings, fixed_events(people, "left"))
        moved_people = people[:60]
        moved = fixed_events(moved_people, "moved", another_profile)
        send(settings, moved)
    expected = {c: s for c, s in segments(model, moved).items() if s != segments(model, first)[c]}
    assert len(expected) >= 30, "the test must move a good part of the customers"
    records = changes_for(settings, who, at_least=len(people) + len(expected))
    later = [r for r in records if r["cause"] != "initial"]
    assert Counter(r["cause"] for r in later) == {"behaviour": len(expected)}, later[:5]
    assert {r["customer_id"]: r["to_segment_id"] for r in later} == expected
    assert all(r["from_segment_id"] == segments(model, first)[str(r["customer_id"])] for r in later)
    assert len(changes_for(settings, who)) == len(records), "no change arrives later"


@pytest.mark.integration
def test_a_new_model_that_moves_a_segment_shows_as_model_caused_changes(settings: Settings) -> None:
    store, v1 = trained(settings)
    people = customers(300, seed=12, prefix="f")
    who = {c.customer_id for c in people}
    first = fixed_events(people, "first")
    # v2: one segment's centre moved past another's, as a retrain after drift may move it
    centroids = v1.centroids.copy()
    centroids[0] = 2 * centroids[1] - centroids[0]
    v2 = v1.bundle.model_copy(update={"version": store.allocate_version(), "centroids": centroids.tolist(),
                                      "previous_version": v1.version})
    with running_consumer(settings) as rc:
        send(settings, first)
        publish(model_topic(settings), store, v2, v1.version)
        wait_until(lambda: active_version(rc) == v2.version, 30, "the consumer to swap v2 in")
        again = fixed_events(people, "again")
        send(settings, again)
    before, after = segments(v1, first), segments(ActiveModel.of(v2), again)
    expected = {c: s for c, s in after.items() if s != before[c]}
    assert expected, "v2 must move some customers"
    records = changes_for(settings, who, at_least=len(people) + len(expected))
    later = [r for r in records if r["cause"] != "initial"]
    assert Counter(r["cause"] for r in later) == {"model": len(expected)}
    assert {r["customer_id"]: (r["from_model_version"], r["to_model_version"]) for r in later} == {
        c: (v1.version, v2.version) for c in expected}
    assert {r["customer_id"]: r["to_segment_id"] for r in later} == expected


@pytest.mark.integration
@pytest.mark.system  # kills a consumer process: the system tier (make system)
@pytest.mark.parametrize("delivery", ["at-least-once", "exactly-once"])
def test_a_consumer_killed_mid_stream_never_invents_a_change(
    settings_factory: Callable[..., Settings], tmp_path: Path, delivery: str,
) -> None:
    settings = settings_factory(delivery=delivery, batch_size=100)
    trained(settings)
    people = customers(3000, seed=13, prefix="f")
    who = {c.customer_id for c in people}
    log = tmp_path / "consumer.log"
    proc = start_service(settings, "consumer", log)
    try:
        messages = fixed_events(people, "first")
        produce_raw(settings, messages)
        assert settings.changes_topic is not None
        topic = settings.changes_topic
        wait_until(lambda: len(read_topic(settings, topic, lambda rs: len(rs) > 800, 3)) > 800, 60,
                   "some changes before the kill")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc = start_service(settings, "consumer", log)
        read_outputs(settings, {json.loads(v)["event_id"] for _, v in messages}, timeout_s=90)
        produce_raw(settings, fixed_events(people, "again"))  # the same features: no change
        read_outputs(settings, {f"again-{i}" for i in range(len(people))}, timeout_s=90)
    finally:
        proc.terminate()
        proc.wait(20)
    records = changes_for(settings, who, at_least=len(people))
    assert Counter(r["cause"] for r in records).keys() == {"initial"}, log.read_text()[-2000:]
    per_customer = Counter(str(r["customer_id"]) for r in records)
    assert set(per_customer) == who
    if delivery == "exactly-once":
        assert max(per_customer.values()) == 1, "each change exactly once"
    else:  # a replay may repeat a change, from the event that made it
        assert all(str(r["event_id"]).startswith("first-") for r in records)


@pytest.mark.integration
def test_records_on_the_changes_topic_that_are_not_changes_are_skipped_when_state_is_rebuilt(
    settings: Settings,
) -> None:
    trained(settings)
    assert settings.changes_topic is not None
    producer = Producer(producer_config(settings))
    # garbage, an empty key (a compacted topic refuses a null one), and a customer's record with a
    # wrong-typed segment id: on every partition
    poison = [(b"p-0", b"\xff not json"), (b"", b"{}"), (b"f-1", json.dumps(
        {"to_segment_id": True, "to_segment": "x", "to_model_version": 1, "event_time": 0}).encode())]
    for partition in range(settings.events_partitions):
        for key, value in poison:
            producer.produce(settings.changes_topic, key=key, value=value, partition=partition)
    assert producer.flush(30) == 0
    people = customers(60, seed=15, prefix="f")
    with running_consumer(settings) as rc:
        send(settings, fixed_events(people, "first"))
        held = len(rc.loop.changes.state)
        invalid = sample(rc.metrics, "segment_change_records_invalid_total")
    assert held >= 1 and invalid == len(poison) * held
    records = changes_for(settings, {c.customer_id for c in people}, at_least=len(people) + 1)
    poisoned = settings.events_partitions  # the f-1 records: on the topic, never taken as state
    assert Counter(r.get("cause") for r in records) == {"initial": len(people), None: poisoned}


@pytest.mark.integration
def test_a_transaction_left_open_holds_the_rebuild_instead_of_cutting_off_later_commits(
    settings: Settings,
) -> None:
    """A member killed mid-transaction leaves it open until it is aborted (or
    times out); the last stable offset stops there. Another member's change committed after it
    must not be cut off by the rebuild: the rebuild waits (``ReadIncomplete``: the batch is held
    and retried), then reads it once the open transaction is aborted."""
    assert settings.changes_topic is not None
    topic = settings.changes_topic
    killed = Producer(producer_config(settings, f"{settings.consumer_group}-killed"))
    owner = Producer(producer_config(settings, f"{settings.consumer_group}-owner"))
    for p in (killed, owner):
        p.init_transactions(30)
    e = CustomerEvent(customer_id="t-1", event_time=NOW_MS, event_id="e-1", features={})
    killed.begin_transaction()
    killed.produce(topic, key=b"t-0", partition=0,
                   value=change_value(e, NOW_MS, None, 1, "a", 1, "initial", "T"))
    assert killed.flush(30) == 0  # written, never committed
    owner.begin_transaction()
    owner.produce(topic, key=b"t-1", partition=0,
                  value=change_value(e, NOW_MS, None, 2, "b", 1, "initial", "T"))
    owner.commit_transaction(30)
    reader = TopicReader(settings, "test-restore")
    try:
        with pytest.raises(ReadIncomplete):
            list(read_to_end(reader, topic, [0], 3.0))
        killed.abort_transaction(30)  # what the restarted member's init_transactions does
        read = [(m.key(), json.loads(m.value() or b"")["to_segment_id"])
                for m in read_to_end(reader, topic, [0], 30.0)]
    finally:
        reader.close()
    assert read == [(b"t-1", 2)]


@pytest.mark.integration
def test_a_rebuild_cut_off_by_its_time_budget_goes_on_where_it_stopped(settings: Settings) -> None:
    """A partition too large to read within one call's budget is rebuilt over
    several calls (the batch held meanwhile), each going on from where the last one stopped,
    into the same state one uninterrupted read gives; a revoked partition starts again."""
    assert settings.changes_topic is not None
    producer = Producer(producer_config(settings))
    e = CustomerEvent(customer_id="r", event_time=NOW_MS, event_id="e-1", features={})
    n = 6000
    for i in range(n):
        producer.produce(settings.changes_topic, key=f"r-{i % 4000}".encode(), partition=0,
                         value=change_value(e, NOW_MS + i, None, i % 7, "s", 1, "initial", "T"))
    assert producer.flush(30) == 0
    changes = build_changes(settings.model_copy(update={"delivery_timeout_s": 1e-6}),
                             ConsumerMetrics(), lambda v: None)
    batch = [Msg(at(0.1), 0)]
    calls, progress = 0, []
    while 0 not in changes.state:
        calls += 1
        assert calls <= n, "no progress"
        try:
            changes.prepare(batch)
        except ChangesUnavailable:
            progress.append(changes._positions[0].next)
    assert calls > 2 and progress == sorted(progress) and progress[-1] < n
    assert len(changes.state[0]) == 4000 and not changes._partial and not changes._positions
    assert changes.state[0]["r-3"] == Recorded(4003 % 7, "s", 1, NOW_MS + 4003)
    assert changes.state[0]["r-3999"] == Recorded(3999 % 7, "s", 1, NOW_MS + 3999)

    whole = build_changes(settings, ConsumerMetrics(), lambda v: None)
    whole.prepare(batch)
    assert whole.state == changes.state
    changes.forget([0])  # revoked: nothing kept, the next rebuild starts from the first record
    with pytest.raises(ChangesUnavailable):
        changes.prepare(batch)
    assert changes._positions[0].next < progress[-1]
