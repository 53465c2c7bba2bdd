"""Every record read back is data, never a crash, on the real stack: hostile
records written to the changes topic, the models topic and the Redis keys with the project's own
clients, then the consumer, `trainer run`, `trainer once` and the CLI keep working and derive from
the good records what they would have without the bad ones. The corpus itself, record kind by
record kind, is ``tests/segmentation/test_readback.py`` (no stack)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from confluent_kafka import Producer

from chaos.poison import DEEP, poison_models_topic
from demo.generator import another_profile
from segmentation.kafka import producer_config
from segmentation.metrics import TrainerMetrics
from segmentation.model_log import read_registry
from segmentation.settings import Settings
from segmentation.store import ModelStore, connect
from tests.support.fixed import changes_for, fixed_events, segments, send, trained
from tests.support.stack import (
    customers,
    empty_redis,
    free_port,
    read_topic,
    running_consumer,
    sample,
    settings_env,
    start_service,
    wait_until,
)
from trainer.__main__ import catch_up, model_topic, train_config
from trainer.pipeline import train_once

pytestmark = pytest.mark.integration  # every test here runs against the local stack


def trainer_cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m trainer ARGS`` as an operator runs it."""
    return subprocess.run([sys.executable, "-m", "trainer", *args], env=settings_env(settings),
                          capture_output=True, text=True, timeout=180)


def scrape(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            return str(resp.read().decode())
    except OSError:
        return ""


def counted(metrics: str, source: str, reason: str) -> float:
    """``segment_readback_rejected_total{source, reason}`` in a /metrics text (0 if absent)."""
    line = f'segment_readback_rejected_total{{reason="{reason}",source="{source}"}} '
    return next((float(x[len(line):]) for x in metrics.splitlines() if x.startswith(line)), 0.0)


def test_hostile_change_records_are_skipped_on_rebuild_and_every_true_change_is_still_made(
    settings: Settings,
) -> None:
    """Rows 1 and 4: a 50,000-deep record and records dated 9999-12-31 on the changes topic."""
    _, model = trained(settings)
    assert settings.changes_topic is not None
    people = customers(60, seed=21, prefix="h")
    who = {c.customer_id for c in people}
    first = fixed_events(people, "first")
    with running_consumer(settings):
        send(settings, first)
    changes_for(settings, who, at_least=len(people))
    # until every customer's record is read (at-least-once may have written some twice: a count
    # can be reached before the last partition is read)
    partition_of = {(r.key or b"").decode(): r.partition for r in read_topic(
        settings, settings.changes_topic, lambda rs: who <= {(r.key or b"").decode() for r in rs})}

    movers = people[:30]
    producer = Producer(producer_config(settings))
    for p in range(settings.events_partitions):  # row 1, on every partition; keys no customer has
        producer.produce(settings.changes_topic, key=b"h-deep", value=b'{"to_segment_id":' + b"[" * DEEP,
                         partition=p)
        producer.produce(settings.changes_topic, key=b"k" * 300, value=b"{}", partition=p)
    for c in movers:  # row 4: the customer's own segment, dated 9999, where its state lives
        future = {"customer_id": c.customer_id, "to_segment_id": segments(model, first)[c.customer_id],
                  "to_segment": "x", "to_model_version": model.version, "changed_at": "hostile",
                  "event_time": "9999-12-31T23:59:59.999Z"}
        producer.produce(settings.changes_topic, key=c.customer_id.encode(),
                         value=json.dumps(future).encode(), partition=partition_of[c.customer_id])
    assert producer.flush(30) == 0

    moved = fixed_events(movers, "moved", another_profile)
    with running_consumer(settings) as rc:  # a restart: every partition is rebuilt from the topic
        send(settings, moved)
        too_deep = sample(rc.metrics, "segment_readback_rejected_total", source="changes_topic",
                          reason="too_deep")
        bad_time = sample(rc.metrics, "segment_readback_rejected_total", source="changes_topic",
                          reason="bad_time")
        late = sample(rc.metrics, "segment_change_late_events_total")
    assert too_deep >= 1 and bad_time >= 1 and late == 0
    before, after = segments(model, first), segments(model, moved)
    expected = {c: s for c, s in after.items() if s != before[c]}
    assert len(expected) >= 15, "the test must move a good part of the movers"
    records = changes_for(settings, who, at_least=len(people) + len(movers) + len(expected))
    later = [r for r in records if r.get("changed_at") != "hostile" and r["cause"] != "initial"]
    assert Counter(r["cause"] for r in later) == {"behaviour": len(expected)}
    assert {r["customer_id"]: (r["from_segment_id"], r["to_segment_id"]) for r in later} == {
        c: (before[c], s) for c, s in expected.items()}


def test_hostile_models_topic_records_never_stop_the_consumer_s_fallback_or_a_trainer_run(
    settings: Settings,
) -> None:
    """Row 2: a tombstone keyed v², pointers nested 50,000 deep, odd keys, on the models topic."""
    store, v1 = trained(settings)
    assert poison_models_topic(settings) == 11  # the chaos table's corpus (chaos/poison.py)
    registry = read_registry(settings)
    assert (registry.current, registry.pinned, sorted(registry.bundles), registry.invalid_records) == (
        v1.version, None, [v1.version], 11)

    empty_redis(settings)  # the documented recovery: a consumer takes the model from the topic
    people = customers(40, seed=22, prefix="m")
    with running_consumer(settings) as rc:
        outputs = send(settings, fixed_events(people, "after"))
        bad_keys = sample(rc.metrics, "segment_readback_rejected_total", source="models_topic",
                          reason="bad_key")
    assert len(outputs) == len(people) and {o["model_version"] for o in outputs.values()} == {v1.version}
    assert bad_keys >= 5

    catch_up(model_topic(settings), store)  # what `trainer run` does every 5 s: no exception escapes
    assert store.current_version() == v1.version
    # `trainer once` publishes again
    result = train_once(train_config(settings), store, TrainerMetrics(), force=True)
    assert (result.result, result.version) == ("published", v1.version + 1), result.detail


def test_poisoned_redis_keys_never_stop_trainer_run_show_history_or_report(
    settings: Settings, tmp_path: Path,
) -> None:
    """Row 3: nested values under seg:online:<replica> and seg:runs, and a nested current pointer."""
    store, v1 = trained(settings)
    p, client = settings.redis_prefix, connect(settings)
    client.set(f"{p}:online:evil", b'{"model_version":' + b"[" * DEEP)
    client.set(f"{p}:online:late", json.dumps({"model_version": v1.version, "at": 253402214400.0}))
    client.lpush(f"{p}:runs", b'{"at":' + b"[" * DEEP, json.dumps({"at": "x", "result": "rejected"}))
    client.zadd(f"{p}:versions", {"9" * 5000: 3, "v²": 4})
    client.set(f"{p}:current", b"[" * DEEP)  # the catch-up of `trainer run` rewrites it from the topic

    port = free_port()
    proc = start_service(settings, "trainer run", tmp_path / "trainer.log", SEG_METRICS_PORT=str(port),
                         SEG_MIN_ROWS="10000000")
    try:
        wait_until(lambda: counted(scrape(port), "replica_state", "too_deep") >= 1, 60,
                   "the nested replica state refused")
        wait_until(lambda: ModelStore(connect(settings), p).pointers_readable(), 30, "the pointer rewritten")
        time.sleep(3)  # a few more polls of the schedule on the poisoned keys
        assert proc.poll() is None, (tmp_path / "trainer.log").read_text()[-3000:]
        metrics = scrape(port)
    finally:
        proc.terminate()
        proc.wait(30)
    assert store.current_version() == v1.version
    assert counted(metrics, "replica_state", "bad_time") >= 1
    assert counted(metrics, "redis_pointer", "too_large") >= 1

    for args in (["show"], ["show", "--json"], ["history"], ["history", "--json"],
                 ["report", "--out", str(tmp_path / "report")]):
        out = trainer_cli(settings, *args)
        assert out.returncode == 0, (args, out.stderr[-2000:])
    assert f"model v{v1.version}" in trainer_cli(settings, "show").stdout
