"""Hostile records on the service's own topics and Redis keys: what a buggy or malicious writer
with access to them could leave there. Each writer uses the project's own clients, so
the records land where the service reads them back: the changes topic (on the partition of the
customer they name), the models topic, and every Redis key the consumer or the trainer reads."""

from __future__ import annotations

import json

from confluent_kafka import Producer

from segmentation.kafka import producer_config
from segmentation.model_log import ModelLog
from segmentation.settings import Settings
from segmentation.store import connect
from segmentation.store.keys import Keys

DEEP = 50_000  # nesting depth of the deep records: far past any parser's recursion limit
FAR_FUTURE = "9999-12-31T23:59:59.999Z"
NESTED = b'{"version":' + b"[" * DEEP

# The models topic: tombstones under keys that are no version, and pointers and bundles that
# are no JSON a reader may parse. None of them names a real version.
MODELS_TOPIC: list[tuple[str, bytes | None]] = [
    ("v\u00b2", None), ("v-1", None), ("v", None), ("v1e3", None), ("v\u0661", None),
    ("current", NESTED), ("pinned", NESTED), ("reserved", NESTED), ("challenger", NESTED),
    ("v7", b"{oops"), ("v8", b"[" * DEEP),
]


def poison_changes_topic(settings: Settings, customer_ids: list[str], segment_id: int) -> int:
    """On every partition a record nested ``DEEP`` levels and one under a 300-byte key; and
    for each of ``customer_ids``, a change dated 9999-12-31 to ``segment_id`` under its own key
    (so on its partition, where its change state is rebuilt from). Returns how many."""
    assert settings.changes_topic is not None
    producer = Producer(producer_config(settings))
    sent = 0
    for p in range(settings.events_partitions):
        producer.produce(settings.changes_topic, key=b"poison-deep", partition=p,
                         value=b'{"to_segment_id":' + b"[" * DEEP)
        producer.produce(settings.changes_topic, key=b"k" * 300, value=b"{}", partition=p)
        sent += 2
    for customer_id in customer_ids:
        future = {"customer_id": customer_id, "to_segment_id": segment_id, "to_segment": "x",
                  "to_model_version": 1, "changed_at": "hostile", "event_time": FAR_FUTURE}
        producer.produce(settings.changes_topic, key=customer_id.encode(), value=json.dumps(future).encode())
        sent += 1
    if producer.flush(30):
        raise RuntimeError("poisoned change records not delivered")
    return sent


def poison_models_topic(settings: Settings) -> int:
    """``MODELS_TOPIC`` appended to the models topic; returns how many records."""
    ModelLog(settings).append(MODELS_TOPIC)
    return len(MODELS_TOPIC)


def poison_redis(settings: Settings, customer_ids: list[str]) -> list[str]:
    """Nested and out-of-range values under every key the service reads back; returns the
    keys written. The current pointer is among them: `trainer run`'s catch-up rewrites it
    from the models topic, and a consumer that cannot read it keeps (or takes from the
    topic) the model it has."""
    keys, client = Keys(settings.redis_prefix), connect(settings)
    client.set(keys.online("poison-deep"), b'{"model_version":' + b"[" * DEEP)
    client.set(keys.online("poison-late"), json.dumps({"model_version": 1, "at": 253402214400.0}))
    client.lpush(keys.runs, b'{"at":' + b"[" * DEEP, json.dumps({"at": "x", "result": "rejected"}))
    client.zadd(keys.versions, {"9" * 5000: 3, "v\u00b2": 4})
    client.set(keys.challenger, NESTED)
    client.set(keys.current, b"[" * DEEP)
    for customer_id in customer_ids:  # dated 9999: it would win over every real event
        client.hset(keys.customer(customer_id), mapping={
            "event_ms": "253402300799999", "offset": "0", "segment_id": "[" * 1000,
            "model_version": "v\u00b2"})
    return [keys.online("poison-deep"), keys.online("poison-late"), keys.runs, keys.versions,
            keys.challenger, keys.current, *(keys.customer(c) for c in customer_ids)]
