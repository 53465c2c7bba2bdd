"""Kafka with authentication and least privilege, on a real broker of the test's own
(``KAFKA_SASL=1 scripts/stack.sh``: SCRAM-SHA-512 clients, PLAIN on the controller listener,
StandardAuthorizer with ``allow.everyone.if.no.acl.found=false``), set up by the explicit admin
step (``python -m segmentation.admin all``, what ``make topics`` runs): every write a principal
has no business doing is refused, a client that cannot log in gets nothing, and every path the
services use works, exactly-once transactions in the consumer's group included."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import (
    AclBinding,
    AclOperation,
    AclPermissionType,
    AdminClient,
    ResourcePatternType,
    ResourceType,
)
from pydantic import SecretStr

from segmentation.admin import SUBSCRIBER_GROUP_PREFIX, apply_acls, plan, upsert_users
from segmentation.kafka import (
    TopicReader,
    check_co_partitioned,
    client_common,
    consumer_config,
    ensure_topics,
    producer_config,
    read_to_end,
)
from segmentation.settings import Settings
from tests.support.stack import PrivateBroker, make_settings, settings_env, wait_until

pytestmark = pytest.mark.integration


@dataclass
class Sasl:
    broker: PrivateBroker
    settings: Settings  # the project's topics and group on the private broker, no login

    def as_(self, principal: str, password: str | None = None) -> Settings:
        """``settings`` logging in as ``principal`` (with its real password unless given)."""
        secret = SecretStr(password if password is not None else self.broker.password(principal))
        return self.settings.model_copy(update={"kafka_extra": self.broker.login(principal),
                                                "kafka_password": secret})


@pytest.fixture(scope="module")
def sasl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sasl]:
    broker = PrivateBroker(tmp_path_factory.mktemp("sasl-kafka"), sasl=True)
    broker.start()
    try:
        settings = make_settings(kafka_bootstrap=broker.bootstrap)
        # the admin step as `make topics` runs it: topics, SCRAM users, ACLs (logged in as admin)
        done = subprocess.run(
            [sys.executable, "-m", "segmentation.admin", "--secrets-dir", str(broker.secrets), "all"],
            env=settings_env(settings), capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "acls: 22 applied" in done.stdout, done.stdout
        yield Sasl(broker, settings)
    finally:
        broker.stop()


def test_both_listeners_authenticate_and_nothing_is_allowed_without_an_acl(sasl: Sasl) -> None:
    """What scripts/stack.sh rendered (a later key wins in a properties file); the file holds the
    broker's password, so only its owner reads it."""
    path = sasl.broker.secrets.parent / "server.properties"
    props: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            props[key] = value
    protocols = "CONTROLLER:SASL_PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT"
    assert props["listener.security.protocol.map"] == protocols
    assert props["listeners"].startswith("SASL_PLAINTEXT://")
    assert props["sasl.mechanism.controller.protocol"] == "PLAIN"
    assert props["sasl.mechanism.inter.broker.protocol"] == "SCRAM-SHA-512"
    assert props["authorizer.class.name"] == "org.apache.kafka.metadata.authorizer.StandardAuthorizer"
    assert props["allow.everyone.if.no.acl.found"] == "false"
    assert path.stat().st_mode & 0o077 == 0
    assert all((f.stat().st_mode & 0o077) == 0 for f in sasl.broker.secrets.iterdir())


def produce_one(settings: Settings, topic: str, value: bytes, timeout_s: float = 20.0) -> KafkaError | None:
    """Produce one record as the service producers do (idempotent); its delivery error or None."""
    reports: list[KafkaError | None] = []
    producer = Producer(producer_config(settings))
    producer.produce(topic, key=b"k", value=value, on_delivery=lambda err, _msg: reports.append(err))
    deadline = time.monotonic() + timeout_s
    while not reports and time.monotonic() < deadline:
        producer.flush(0.5)
    assert reports, f"no delivery report for {topic} in {timeout_s}s"
    return reports[0]


def values_of(sasl: Sasl, topic: str) -> list[bytes]:
    """Every committed value of ``topic``, read as the admin (a super user)."""
    admin = sasl.as_("admin")
    reader = TopicReader(admin, f"check-{uuid.uuid4().hex[:6]}")
    try:
        partitions = reader.records.list_topics(topic, timeout=10).topics[topic].partitions
        return [m.value() or b"" for m in read_to_end(reader, topic, sorted(partitions), 20.0)]
    finally:
        reader.close()


def test_each_forbidden_write_is_refused(sasl: Sasl) -> None:
    s = sasl.settings
    assert s.changes_topic is not None
    tag = uuid.uuid4().hex.encode()
    forbidden = [("producer", s.models_topic), ("consumer", s.models_topic),
                 ("trainer", s.changes_topic), ("producer", s.segments_topic),
                 ("trainer", s.segments_topic)]
    for principal, topic in forbidden:
        err = produce_one(sasl.as_(principal), topic, tag + principal.encode())
        assert err is not None and err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, \
            f"{principal} -> {topic}: {err}"
    # a subscriber writes nowhere: its idempotent producer does not even get a producer id
    for topic in (s.segments_topic, s.events_topic):
        forbidden.append(("subscriber", topic))
        code = refusal_of(sasl.as_("subscriber"), topic, tag + b"subscriber")
        assert code in (KafkaError.CLUSTER_AUTHORIZATION_FAILED, KafkaError.TOPIC_AUTHORIZATION_FAILED,
                        KafkaError._FATAL), code
    for topic in {t for _, t in forbidden}:
        assert not [v for v in values_of(sasl, topic) if v.startswith(tag)], topic


def refusal_of(settings: Settings, topic: str, value: bytes) -> int | None:
    """``produce_one``'s error code, also when the refusal is fatal to the producer (no producer
    id): raised from the client's error callback inside flush, or reported as ``_FATAL``."""
    try:
        err = produce_one(settings, topic, value)
    except (KafkaException, SystemError) as exc:
        fatal = exc if isinstance(exc, KafkaException) else exc.__cause__
        assert isinstance(fatal, KafkaException), exc
        return int(fatal.args[0].code())
    return None if err is None else int(err.code())


def refused_write(conf: dict[str, Any], topic: str, value: bytes, expected: set[int],
                  what: str) -> KafkaError | None:
    """Produce one record with ``conf``; wait for a client error in ``expected``, then purge the
    record and return its delivery report's error."""
    errors: list[KafkaError] = []
    reports: list[KafkaError | None] = []
    producer = Producer({**conf, "error_cb": errors.append, "message.timeout.ms": 5000})
    producer.produce(topic, value=value, on_delivery=lambda err, _m: reports.append(err))
    wait_until(lambda: producer.poll(0.2) >= 0 and bool({e.code() for e in errors} & expected),
               20, f"{what}: refused ({errors})")
    producer.purge()
    wait_until(lambda: producer.flush(0.2) == 0 and bool(reports), 10, f"{what}: delivery report")
    return reports[0]


def test_a_client_that_cannot_log_in_gets_nothing(sasl: Sasl) -> None:
    s = sasl.settings
    tag = uuid.uuid4().hex.encode()
    clients: dict[str, dict[str, Any]] = {
        "wrong password": client_common(sasl.as_("producer", password="not-the-password-0")),
        "unknown user": client_common(sasl.as_("nobody", password="whatever-password-0")),
        "no authentication": {"bootstrap.servers": sasl.broker.bootstrap},
    }
    for what, conf in clients.items():
        expected = ({KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN} if what == "no authentication"
                    else {KafkaError._AUTHENTICATION})
        report = refused_write(conf, s.events_topic, tag, expected, what)
        assert report is not None, f"{what}: a record was accepted"
    assert tag not in values_of(sasl, s.events_topic)


def test_each_service_path_works_with_its_own_principal(sasl: Sasl) -> None:
    s = sasl.settings
    assert s.changes_topic is not None
    producer, consumer, trainer = sasl.as_("producer"), sasl.as_("consumer"), sasl.as_("trainer")

    # the services' own start: topics exist (nothing to create, nothing refused), co-partitioned
    assert ensure_topics(consumer) == [] and ensure_topics(trainer) == []
    check_co_partitioned(consumer)

    # producers write events
    p = Producer(producer_config(producer))
    n = 30
    for i in range(n):
        p.produce(s.events_topic, key=f"c{i}".encode(), value=f"event {i}".encode())
    assert p.flush(20) == 0

    # the trainer reads them (its window reader's group) and writes a model
    reader = TopicReader(trainer, "trainer")
    try:
        window = list(read_to_end(reader, s.events_topic, range(s.events_partitions), 20.0))
    finally:
        reader.close()
    assert len(window) >= n
    model = f"model {uuid.uuid4().hex}".encode()
    assert produce_one(trainer, s.models_topic, model) is None

    # the consumer reads the models topic (its fallback reader) ...
    reader = TopicReader(consumer, "models-reader")
    try:
        assert model in [m.value() for m in read_to_end(reader, s.models_topic, [0], 20.0)]
    finally:
        reader.close()

    # ... and, exactly-once in its group: reads events, writes segments, dead letters and changes
    # and the input offsets in one transaction
    c = Consumer(consumer_config(consumer, exactly_once=True))
    tx = Producer(producer_config(consumer, f"{consumer.transactional_id}-{consumer.replica_id}"))
    try:
        tx.init_transactions(30)
        c.subscribe([s.events_topic])
        got: list[Message] = []
        deadline = time.monotonic() + 30
        while len(got) < n and time.monotonic() < deadline:
            for m in c.consume(num_messages=100, timeout=0.5):
                assert m.error() is None, m.error()
                got.append(m)
        assert len(got) >= n, f"the consumer principal read {len(got)} of {n} events"
        tx.begin_transaction()
        for m in got:
            tx.produce(s.segments_topic, key=m.key(), value=b"segment:" + (m.value() or b""))
            tx.produce(s.changes_topic, key=m.key(), value=b"change")
        tx.produce(s.dlq_topic, key=b"bad", value=b"dead letter")
        next_offsets: dict[int, int] = {}
        for m in got:
            part, offset = int(m.partition() or 0), int(m.offset() or 0)
            next_offsets[part] = max(next_offsets.get(part, 0), offset + 1)
        offsets = [TopicPartition(s.events_topic, part, off) for part, off in next_offsets.items()]
        tx.send_offsets_to_transaction(offsets, c.consumer_group_metadata(), 30)
        tx.commit_transaction(30)
        committed = c.committed([TopicPartition(s.events_topic, part) for part in next_offsets], 10)
        assert {tp.partition: tp.offset for tp in committed} == next_offsets
    finally:
        c.close()

    assert len([v for v in values_of(sasl, s.segments_topic) if v.startswith(b"segment:")]) == len(got)
    assert b"dead letter" in values_of(sasl, s.dlq_topic)
    # the consumer reads the changes back (its restore reader's group)
    reader = TopicReader(consumer, "changes-restore")
    try:
        changes = list(read_to_end(reader, s.changes_topic, range(s.events_partitions), 20.0))
    finally:
        reader.close()
    assert len(changes) == len(got)

    # downstream, a subscriber reads the assignments in a group of its own prefix (read_committed)
    sub = Consumer({**client_common(sasl.as_("subscriber")), "enable.auto.commit": False,
                    "group.id": f"{SUBSCRIBER_GROUP_PREFIX}crm-{uuid.uuid4().hex[:6]}",
                    "auto.offset.reset": "earliest", "isolation.level": "read_committed"})
    outputs: list[bytes] = []
    try:
        sub.subscribe([s.segments_topic])
        deadline = time.monotonic() + 30
        while len(outputs) < len(got) and time.monotonic() < deadline:
            for m in sub.consume(num_messages=100, timeout=0.5):
                assert m.error() is None, m.error()
                if (m.value() or b"").startswith(b"segment:"):
                    outputs.append(m.value() or b"")
        sub.commit(asynchronous=False)  # its group's offsets: allowed under its prefix
    finally:
        sub.close()
    assert len(outputs) == len(got)


def test_the_acls_are_exactly_the_plan(sasl: Sasl) -> None:
    """Re-applying is idempotent, and an ACL a principal should not hold is taken away."""
    admin = AdminClient(client_common(sasl.as_("admin")))
    grants = plan(sasl.settings)
    stray = AclBinding(ResourceType.TOPIC, sasl.settings.models_topic, ResourcePatternType.LITERAL,
                       "User:producer", "*", AclOperation.WRITE, AclPermissionType.ALLOW)
    for future in admin.create_acls([stray]).values():
        future.result(timeout=30)
    assert apply_acls(admin, grants) == (len(grants), 1)
    assert apply_acls(admin, grants) == (len(grants), 0)
    err = produce_one(sasl.as_("producer"), sasl.settings.models_topic, b"after the stray ACL went")
    assert err is not None and err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED


def test_a_rotated_password_replaces_the_old_one(sasl: Sasl) -> None:
    """SCRAM upsert (the admin step's ``users``): the new password logs in, the old one no longer."""
    admin = AdminClient(client_common(sasl.as_("admin")))
    old, new = sasl.broker.password("trainer"), f"rotated-{uuid.uuid4().hex}"
    upsert_users(admin, {"trainer": new})
    try:
        assert produce_one(sasl.as_("trainer", password=new), sasl.settings.models_topic, b"rotated") is None
        conf = client_common(sasl.as_("trainer", password=old))
        assert refused_write(conf, sasl.settings.models_topic, b"old", {KafkaError._AUTHENTICATION},
                             "old password") is not None
    finally:
        upsert_users(admin, {"trainer": old})
