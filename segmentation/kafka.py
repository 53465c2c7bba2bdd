"""Kafka client configuration (built in one place) and the project's topics."""

from __future__ import annotations

import logging
import time
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from segmentation.settings import Settings

log = logging.getLogger(__name__)


def consumer_config(settings: Settings, exactly_once: bool) -> dict[str, Any]:
    """At-least-once: offsets are *stored* by the loop only after outputs are acknowledged and
    auto-committed on an interval. Exactly-once: offsets go through the producer transaction."""
    conf: dict[str, Any] = {
        "group.id": settings.consumer_group,
        "auto.offset.reset": "earliest",
        "enable.auto.offset.store": False,
        "enable.auto.commit": not exactly_once,
        "auto.commit.interval.ms": settings.commit_interval_ms,
        "partition.assignment.strategy": "cooperative-sticky",
        "isolation.level": "read_committed",
        "enable.partition.eof": False,
        "session.timeout.ms": 10000,
        "heartbeat.interval.ms": 1000,
    }
    conf.update(settings.kafka_common())
    return conf


def producer_config(settings: Settings, transactional_id: str | None = None) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "compression.type": "lz4",
    }
    if transactional_id is not None:
        conf["transactional.id"] = transactional_id
    conf.update(settings.kafka_common())
    return conf


def reader_config(settings: Settings, purpose: str) -> dict[str, Any]:
    """A consumer that only reads by explicit assignment and never commits (trainer window)."""
    conf: dict[str, Any] = {
        "group.id": f"{settings.consumer_group}-{purpose}",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "isolation.level": "read_committed",
        "auto.offset.reset": "earliest",
        "enable.partition.eof": True,
    }
    conf.update(settings.kafka_common())
    return conf


def topic_specs(settings: Settings) -> list[NewTopic]:
    """The topics this project owns, with explicit settings."""
    week = str(7 * 24 * 3600 * 1000)
    return [
        NewTopic(settings.events_topic, settings.events_partitions, 1,
                 config={"retention.ms": week}),
        NewTopic(settings.segments_topic, settings.events_partitions, 1,
                 config={"retention.ms": week}),
        NewTopic(settings.dlq_topic, 1, 1, config={"retention.ms": str(30 * 24 * 3600 * 1000)}),
        NewTopic(settings.models_topic, 1, 1,
                 config={"cleanup.policy": "compact", "min.compaction.lag.ms": "0"}),
    ]


def ensure_topics(settings: Settings, timeout_s: float = 30.0) -> list[str]:
    """Create missing topics; returns the names created. Existing topics are left as they are."""
    admin = AdminClient(settings.kafka_common())
    existing = set(admin.list_topics(timeout=timeout_s).topics)
    missing = [t for t in topic_specs(settings) if t.topic not in existing]
    if not missing:
        return []
    created = []
    for name, future in admin.create_topics(missing, request_timeout=timeout_s).items():
        try:
            future.result(timeout=timeout_s)
            created.append(name)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
    _wait_for_leaders(admin, created, timeout_s)
    log.info("topics created", extra={"topics": created})
    return created


def _wait_for_leaders(admin: AdminClient, topics: list[str], timeout_s: float) -> None:
    """Topic creation returns before every partition has a leader; wait until it does."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        listed = admin.list_topics(timeout=timeout_s).topics
        if all(
            t in listed and listed[t].partitions
            and all(p.leader >= 0 for p in listed[t].partitions.values())
            for t in topics
        ):
            return
        time.sleep(0.1)
    raise TimeoutError(f"topics {topics} have no leader after {timeout_s}s")


def delete_topics(settings: Settings, names: list[str], timeout_s: float = 30.0) -> None:
    admin = AdminClient(settings.kafka_common())
    for future in admin.delete_topics(names, request_timeout=timeout_s).values():
        try:
            future.result(timeout=timeout_s)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise
