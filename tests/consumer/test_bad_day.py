"""The bad day on the real broker: hostile messages, outputs the broker refuses, a deleted output
topic, a fenced exactly-once instance, hostile rows in the training window."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource, NewTopic

from consumer import delivery
from consumer.delivery import DeliveryFailed, DeliveryStopped, ExactlyOnce
from consumer.scoring import OutRecord
from segmentation.events import CustomerEvent
from segmentation.kafka import consumer_config, producer_config
from segmentation.metrics import TrainerMetrics
from segmentation.settings import Settings
from segmentation.store import ModelStore, connect
from tests.support.messages import key_of
from tests.support.stack import (
    RunningConsumer,
    customers,
    produce_events,
    produce_raw,
    read_outputs,
    read_topic,
    running_consumer,
    sample,
    wait_until,
)
from trainer.__main__ import train_config, window_config
from trainer.pipeline import train_once
from trainer.window import CustomerSample, read_window


def good_event(event_id: str, **changes: object) -> dict[str, object]:
    event: dict[str, object] = {
        "customer_id": f"n-{event_id}", "event_time": int(time.time() * 1000), "event_id": event_id,
        "features": {"recency_days": 3, "frequency_90d": 14, "monetary_90d": 812.5,
                     "avg_basket_value": 58.0, "sessions_30d": 22, "tenure_days": 730},
        "attributes": {"channel": "app"},
    }
    event.update(changes)
    return event


def hostile_messages() -> dict[str, bytes]:
    """Messages that once stopped a partition or a training run."""
    huge_integer = json.dumps(good_event("h6")).replace('"recency_days": 3', '"recency_days": 1' + "0" * 310)
    return {
        "customer_id of 500,000 characters": json.dumps(good_event("h1", customer_id="c" * 500_000)).encode(),
        "garbage just under 1 MB": bytes(random.Random(1).randbytes(999_000)),
        "attribute key of 600 KB": json.dumps(good_event("h3", attributes={"k" * 600_000: "v"})).encode(),
        "event_time 9999-12-31T23:59:59-23:59": json.dumps(
            good_event("h4", event_time="9999-12-31T23:59:59-23:59")).encode(),
        "event_time 2**63": json.dumps(good_event("h5", event_time=2**63)).encode(),
        "a 310-digit feature": huge_integer.encode(),
    }


def produce(settings: Settings, values: list[bytes]) -> None:
    """Each value keyed by its customer_id, all on partition 0, in this order."""
    producer = Producer(producer_config(settings))
    for value in values:
        producer.produce(settings.events_topic, key=key_of(value), value=value, partition=0)
        producer.poll(0)
    assert producer.flush(30) == 0


def committed(settings: Settings) -> int:
    consumer = Consumer(consumer_config(settings, exactly_once=False))
    meta = consumer.list_topics(settings.events_topic, timeout=10).topics[settings.events_topic]
    # a transaction still open on the group makes the broker wait before it answers
    offsets = consumer.committed([TopicPartition(settings.events_topic, p) for p in meta.partitions], 90)
    consumer.close()
    return sum(max(tp.offset, 0) for tp in offsets)


@pytest.mark.integration
def test_hostile_messages_become_bounded_dead_letters_and_the_partition_goes_on(
    settings: Settings, store: ModelStore, trainer_metrics: TrainerMetrics
) -> None:
    produce_events(settings, customers(600))
    assert train_once(train_config(settings), store, trainer_metrics).result == "published"
    hostile = hostile_messages()
    values: list[bytes] = []
    for i, value in enumerate(hostile.values()):
        values += [json.dumps(good_event(f"good-{i}")).encode(), value]
    values.append(json.dumps(good_event("good-last")).encode())
    with running_consumer(settings) as rc:
        produce(settings, values)  # one partition, in this order
        good_ids = {f"good-{i}" for i in range(len(hostile))} | {"good-last"}
        outputs = read_outputs(settings, good_ids, timeout_s=60)
        dlq = read_topic(settings, settings.dlq_topic, lambda rs: len(rs) >= len(hostile), 60)
        assert rc.error is None

    assert good_ids <= set(outputs)
    assert len(dlq) == len(hostile)
    for letter in dlq:
        size = len(letter.value or b"") + len(letter.key or b"") + sum(
            len(k) + len(v) for k, v in letter.headers.items())
        assert size <= settings.max_record_bytes
    reasons = sorted(letter.headers["dlq.reason"].decode() for letter in dlq)
    assert reasons == sorted(["too_large", "too_large", "too_large", "event_time_out_of_range",
                              "event_time_out_of_range", "out_of_range"])
    truncated = [d for d in dlq if "dlq.truncated" in d.headers]
    assert [int(d.headers["dlq.original.value.bytes"]) for d in truncated] == [999_000]


@pytest.mark.integration
def test_an_output_the_broker_refuses_is_dead_lettered_and_the_batch_goes_on(
    settings_factory: Callable[..., Settings], trainer_metrics: TrainerMetrics
) -> None:
    # one record per produce request, so the broker judges each output on its own
    settings = settings_factory(kafka_extra={"batch.num.messages": "1"})
    store = ModelStore(connect(settings), settings.redis_prefix)
    produce_events(settings, customers(600))
    assert train_once(train_config(settings), store, trainer_metrics).result == "published"
    resource = ConfigResource("topic", settings.segments_topic, incremental_configs=[
        ConfigEntry("max.message.bytes", "900", incremental_operation=AlterConfigOpType.SET)])
    admin = AdminClient(settings.kafka_common())
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(30)
    # 1,000 bytes of UTF-8 within the 250-character limit, random so that lz4 cannot shrink it
    rng = random.Random(7)
    wide = "".join(chr(0x20000 + rng.randrange(40_000)) for _ in range(250))
    values = [json.dumps(good_event("before")).encode(),
              json.dumps(good_event("wide", customer_id=wide)).encode(),
              json.dumps(good_event("after")).encode()]
    with running_consumer(settings) as rc:
        produce(settings, values)
        outputs = read_outputs(settings, {"before", "after"}, timeout_s=60)
        dlq = read_topic(settings, settings.dlq_topic, lambda rs: len(rs) >= 1, 60)
        wait_until(lambda: sample(rc.metrics, "segment_dead_letters_total", reason="output_rejected") == 1)
    assert {"before", "after"} <= set(outputs) and "wide" not in outputs
    assert [d.headers["dlq.reason"] for d in dlq] == [b"output_rejected"]
    assert b"size" in dlq[0].headers["dlq.error"].lower() or b"large" in dlq[0].headers["dlq.error"].lower()
    assert dlq[0].value == values[1]


@pytest.mark.integration
@pytest.mark.parametrize("delivery", ["at-least-once", "exactly-once"])
def test_a_deleted_output_topic_stops_the_consumer_with_the_batch_uncommitted_and_loses_nothing(
    settings_factory: Callable[..., Settings], trainer_metrics: TrainerMetrics, delivery: str
) -> None:
    settings = settings_factory(delivery_timeout_s=20.0, delivery=delivery)
    store = ModelStore(connect(settings), settings.redis_prefix)
    produce_events(settings, customers(300))
    assert train_once(train_config(settings), store, trainer_metrics).result == "published"
    rc = RunningConsumer(settings).start()
    try:
        wait_until(lambda: sample(rc.metrics, "segment_events_total", outcome="scored") >= 300, 60,
                   "first events")
        wait_until(lambda: committed(settings) >= 300, 30, "first commit")
        admin = AdminClient(settings.kafka_common())
        admin.delete_topics([settings.segments_topic])[settings.segments_topic].result(30)
        produce(settings, [json.dumps(good_event(f"late-{i}")).encode() for i in range(20)])
        rc.thread.join(120)
        assert not rc.thread.is_alive(), "the consumer did not stop on a missing output topic"
        assert isinstance(rc.error, DeliveryStopped), rc.error
        assert committed(settings) == 300  # the failing batch's offsets were not committed
    finally:
        rc._stop.set()
        rc.thread.join(30)

    # the operator recreates the topic and restarts: the uncommitted events are scored
    admin.create_topics([NewTopic(settings.segments_topic, settings.events_partitions, 1)])[
        settings.segments_topic].result(30)
    wait_until(lambda: _has_leaders(admin, settings.segments_topic), 30, "leaders")
    with running_consumer(settings):
        outputs = read_outputs(settings, {f"late-{i}" for i in range(20)}, timeout_s=60)
    assert {f"late-{i}" for i in range(20)} <= set(outputs)


def _has_leaders(admin: AdminClient, topic: str) -> bool:
    listed = admin.list_topics(topic, timeout=10).topics.get(topic)
    return bool(listed and listed.partitions and all(p.leader >= 0 for p in listed.partitions.values()))


@pytest.mark.integration
def test_a_fenced_exactly_once_instance_stops_with_one_clear_error(settings: Settings) -> None:
    tid = f"{settings.transactional_id}-fence"
    consumer = Consumer(consumer_config(settings, exactly_once=True))
    consumer.subscribe([settings.events_topic])
    consumer.poll(1)
    first = ExactlyOnce(Producer(producer_config(settings, tid)), consumer, 10)
    second = ExactlyOnce(Producer(producer_config(settings, tid)), consumer, 10)
    record = OutRecord(settings.segments_topic, b"k", b"{}", [])
    try:
        first.deliver([record], [], lambda r, e: None)
        raise AssertionError("the fenced producer delivered")
    except DeliveryStopped as exc:
        assert "fenced" in str(exc).lower() or "epoch" in str(exc).lower(), exc
    second.deliver([record], [], lambda r, e: None)  # the newer instance goes on
    consumer.close()


class StuckOffsets:
    """A real producer whose ``send_offsets_to_transaction`` never returns until released: the
    hang of confluentinc/librdkafka#5456 after a coordinator loss, which no broker action here
    reproduces on demand. Every other call is the real producer's."""

    def __init__(self, real: Producer) -> None:
        self.real = real
        self.release = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def send_offsets_to_transaction(self, *_: object) -> None:
        self.release.wait(120)


@pytest.mark.integration
def test_a_stuck_offsets_call_replaces_the_producer_and_the_batch_commits_once(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A librdkafka stall is recovered inside the process. The stuck producer is fenced by a new one
    of the same transactional id, its open transaction aborted; the batch, replayed, commits its
    output and offsets once."""
    monkeypatch.setattr(delivery, "SEND_OFFSETS_TIMEOUT_S", 1.0)
    monkeypatch.setattr(delivery, "STALL_GRACE_S", 1.0)
    tid = f"{settings.transactional_id}-stuck"
    produce_raw(settings, [("k", b"{}")])
    consumer = Consumer(consumer_config(settings, exactly_once=True))
    consumer.subscribe([settings.events_topic])
    wait_until(lambda: bool(consumer.poll(1)), 30, "the event consumed")
    offsets = [TopicPartition(settings.events_topic, tp.partition, 1) for tp in consumer.assignment()
               if consumer.get_watermark_offsets(tp, timeout=10)[1] == 1]
    stuck = StuckOffsets(Producer(producer_config(settings, tid)))
    eo = ExactlyOnce(cast(Producer, stuck), consumer, 10, lambda: Producer(producer_config(settings, tid)))
    record = OutRecord(settings.segments_topic, b"k", b"{}", [])
    try:
        with pytest.raises(DeliveryFailed, match="producer replaced"):
            eo.deliver([record], offsets, lambda r, e: None)
        assert id(eo.producer) != id(stuck) and eo.replaced == 1
        eo.deliver([record], offsets, lambda r, e: None)  # the replay
        assert committed(settings) == 1
        outputs = read_topic(settings, settings.segments_topic, lambda got: len(got) >= 2, timeout_s=5)
        assert len(outputs) == 1  # the stuck transaction's copy was aborted, never committed
    finally:
        stuck.release.set()
        consumer.close()


def test_default_transactional_ids_differ_between_processes_on_one_host() -> None:
    assert Settings().transactional_id != Settings().transactional_id


@pytest.mark.integration
def test_hostile_rows_in_the_window_never_fail_a_training_run(
    settings: Settings, store: ModelStore, trainer_metrics: TrainerMetrics
) -> None:
    produce_events(settings, customers(600))
    produce(settings, list(hostile_messages().values()))
    result = train_once(train_config(settings), store, trainer_metrics)
    assert result.result == "published", result.detail
    window = read_window(window_config(settings))
    assert window.rows_invalid == len(hostile_messages())
    assert sum(window.invalid_reasons.values()) == window.rows_invalid


def test_the_window_sample_is_bounded_and_independent_of_the_read_order() -> None:
    events = [
        (CustomerEvent(customer_id=f"c{i % 5000}", event_time=i, features={"x": i}), (i % 6, i))
        for i in range(20_000)
    ]

    def sample(order: list[tuple[CustomerEvent, tuple[int, int]]]) -> list[tuple[str, float]]:
        s = CustomerSample(cap=300, key=b"k" * 32)
        for event, position in order:
            s.offer(event, position)
        return sorted((e.customer_id, e.features["x"]) for e in s.events())

    shuffled = events[:]
    random.Random(3).shuffle(shuffled)
    kept = sample(events)
    assert len(kept) == 300 and kept == sample(shuffled)
    # each kept customer's latest event (customer c{j} last appears at 15000 + j)
    assert all(x == 15_000 + int(cid[1:]) for cid, x in kept)


def test_librdkafka_log_lines_go_through_the_project_logger_not_raw_to_stderr(
    capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    dead = Settings(kafka_bootstrap="127.0.0.1:1", consumer_group="nobody")
    consumer = Consumer(consumer_config(dead, exactly_once=False))
    with caplog.at_level(logging.DEBUG, logger="librdkafka"):
        consumer.subscribe(["anything"])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not caplog.records:
            consumer.poll(0.5)
    consumer.close()
    assert any(r.name == "librdkafka" for r in caplog.records)
    assert "%3|" not in capfd.readouterr().err  # librdkafka's raw format never reaches stderr


@pytest.mark.integration
def test_the_report_escapes_every_value_it_did_not_write_itself(
    settings: Settings, store: ModelStore, tmp_path: Path
) -> None:
    from segmentation.bundle import Lineage, ModelBundle, Quality
    from segmentation.features import FeatureSpec
    from trainer.html_report import write_report

    evil = "<script>alert(1)</script>"
    spec = FeatureSpec(numeric=[evil, "b"], log_features=[evil], vocabulary={"ch": [evil, "other"]},
                       center=[0.0, 0.0], scale=[1.0, 1.0])
    bundle = ModelBundle(
        version=1, features=spec, centroids=[[0, 0, 1, 0], [5, 5, 0, 1]], segment_ids=[0, 1],
        segment_names=[evil, "y"],
        quality=Quality(silhouette=0.5, davies_bouldin=0.5, inertia=1.0, shares=[0.5, 0.5], sizes=[1, 1],
                        k_selection=evil, gate={evil: evil}),
        lineage=Lineage(topic=evil, data_sha256=evil, params={evil: evil}, libraries={evil: evil}),
    )
    store.publish(bundle, None)
    page = write_report(store, tmp_path / "report").read_text()
    assert evil not in page and "&lt;script&gt;" in page


@pytest.mark.integration
def test_a_wrong_redis_password_stops_the_consumer_with_one_clear_line(
    settings: Settings, tmp_path: Path
) -> None:
    import subprocess
    import sys

    from tests.support.stack import settings_env

    env = settings_env(settings, SEG_REDIS_USERNAME="seg", SEG_REDIS_PASSWORD="not-the-s3cr3t")
    done = subprocess.run([sys.executable, "-m", "consumer"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "refused the credentials" in lines[0], done.stderr
    assert "s3cr3t" not in done.stderr  # the password is never printed


@pytest.mark.integration
def test_the_local_stack_s_acl_user_reaches_only_the_project_s_keys() -> None:
    from pathlib import Path

    import redis

    password = (Path(__file__).resolve().parents[2] / ".stack" / "redis" / "password").read_text()
    client = redis.Redis(username="seg", password=password.strip())
    assert client.ping()
    client.get("seg:current")  # allowed: the project's prefix
    try:
        client.get("someone-else:key")
        raise AssertionError("the ACL user read a key outside its prefix")
    except redis.exceptions.NoPermissionError:
        pass
