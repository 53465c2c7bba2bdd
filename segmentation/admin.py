"""The explicit admin step for a Kafka with authentication (``make topics``): the project's topics,
the services' SCRAM users and their least-privilege ACLs.

    python -m segmentation.admin [--secrets-dir DIR] topics | users [NAME ...] | acls | plan | all

It connects with the usual settings (``SEG_KAFKA_BOOTSTRAP``, ``SEG_KAFKA_EXTRA``,
``SEG_KAFKA_PASSWORD``) as a super user (``admin`` on the local SASL stack). With
``--secrets-dir`` (``$STACK_DIR/kafka/secrets`` of ``KAFKA_SASL=1 scripts/stack.sh``) and no
``sasl.username`` in ``SEG_KAFKA_EXTRA`` it logs in as ``admin`` over SASL_PLAINTEXT with
SCRAM-SHA-512, with the password of ``admin.password`` there.

* ``topics``: creates the missing topics (``segmentation.kafka.ensure_topics``, the same specs the
  services create when they are allowed to).
* ``users``: creates or rotates (upserts) the SCRAM-SHA-512 credentials of the service principals
  (default ``producer consumer trainer subscriber``). A principal's password is ``$KAFKA_<NAME>_PASSWORD``,
  else the file ``<secrets-dir>/<name>.password``.
* ``acls``: gives each principal exactly the ACLs of ``plan`` and removes any other ACL it holds.
* ``plan``: prints those ACLs, one per line. ``all``: topics, users, acls.

The principals' names are options (``--producer``, ``--consumer``, ``--trainer``,
``--subscriber``: the downstream readers of the assignments). Consumer groups and transactional
ids are matched by prefix: the consumer's group ``SEG_CONSUMER_GROUP`` and its readers
(``<group>-<purpose>``: ``changes-restore``, ``models-reader`` ...), the trainer's readers
(``<group>-trainer...``, ``<group>-models-...``), the subscribers' groups (``subscriber-...``),
and the consumer's transactional ids (``SEG_TRANSACTIONAL_ID`` when it is set, else
``segmentation-``, the default's prefix).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import (
    AclBinding,
    AclBindingFilter,
    AclOperation,
    AclPermissionType,
    AdminClient,
    ResourcePatternType,
    ResourceType,
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialAlteration,
    UserScramCredentialUpsertion,
)
from pydantic import SecretStr

from segmentation.kafka import client_common, ensure_topics, retrying
from segmentation.settings import Settings, load_settings

SERVICE_PRINCIPALS = ("producer", "consumer", "trainer", "subscriber")
SUBSCRIBER_GROUP_PREFIX = "subscriber-"  # downstream readers' consumer groups start with it
SASL_LOGIN = {"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "SCRAM-SHA-512"}
DEFAULT_TRANSACTIONAL_PREFIX = "segmentation-"  # of the default SEG_TRANSACTIONAL_ID
SCRAM_ITERATIONS = 8192
TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class Grant:
    """One ALLOW ACL of a principal (``User:<principal>``), from any host."""

    principal: str
    resource: ResourceType
    name: str
    pattern: ResourcePatternType
    operation: AclOperation

    def binding(self) -> AclBinding:
        return AclBinding(self.resource, self.name, self.pattern, f"User:{self.principal}", "*",
                          self.operation, AclPermissionType.ALLOW)

    def __str__(self) -> str:
        pattern = "prefix" if self.pattern == ResourcePatternType.PREFIXED else "literal"
        return (f"User:{self.principal:<10} {self.operation.name:<10} {self.resource.name.lower():<16} "
                f"{pattern:<8} {self.name}")


def transactional_prefix(settings: Settings) -> str:
    """The consumer's transactional ids are ``<SEG_TRANSACTIONAL_ID>-<replica>`` (consumer.service):
    the setting when it is set, else the prefix of its per-process default."""
    if "transactional_id" in settings.model_fields_set:
        return settings.transactional_id
    return DEFAULT_TRANSACTIONAL_PREFIX


def plan(settings: Settings, producer: str = "producer", consumer: str = "consumer",
         trainer: str = "trainer", subscriber: str = "subscriber") -> list[Grant]:
    """Least privilege: what each principal needs and nothing more. Read and Write imply
    Describe; since Kafka 3.0 Write on a topic also allows the idempotent producer (no cluster
    IdempotentWrite)."""
    topic, group, txn = ResourceType.TOPIC, ResourceType.GROUP, ResourceType.TRANSACTIONAL_ID
    literal, prefixed = ResourcePatternType.LITERAL, ResourcePatternType.PREFIXED
    read, write, describe = AclOperation.READ, AclOperation.WRITE, AclOperation.DESCRIBE
    s = settings
    grants = [Grant(producer, topic, s.events_topic, literal, write)]

    consumer_reads = [s.events_topic, s.models_topic]
    consumer_writes = [s.segments_topic, s.dlq_topic]
    if s.changes_topic is not None:
        consumer_reads.append(s.changes_topic)  # rebuilds its customers' last segments from it
        consumer_writes.append(s.changes_topic)
    grants += [Grant(consumer, topic, t, literal, read) for t in consumer_reads]
    grants += [Grant(consumer, topic, t, literal, write) for t in consumer_writes]
    # its group and its readers' groups (<group>-changes-restore, <group>-models-reader, ...)
    grants.append(Grant(consumer, group, s.consumer_group, prefixed, read))
    grants += [Grant(consumer, txn, transactional_prefix(s), prefixed, op) for op in (write, describe)]

    grants += [Grant(trainer, topic, s.events_topic, literal, read),
               Grant(trainer, topic, s.models_topic, literal, read),
               Grant(trainer, topic, s.models_topic, literal, write)]
    # ensure_topics at its start lists the project's topics: it must see that the others exist
    others = [t for t in (s.segments_topic, s.dlq_topic, s.changes_topic) if t is not None]
    grants += [Grant(trainer, topic, t, literal, describe) for t in others]
    # its readers' groups: <group>-trainer, -trainer-probe (window), <group>-models-probe/-reader
    grants += [Grant(trainer, group, f"{s.consumer_group}-{purpose}", prefixed, read)
               for purpose in ("trainer", "models-")]

    # downstream: the assignments, the dead letters and the segment changes, nothing upstream
    grants += [Grant(subscriber, topic, t, literal, read) for t in others]
    grants.append(Grant(subscriber, group, SUBSCRIBER_GROUP_PREFIX, prefixed, read))
    return grants


def login(settings: Settings, name: str, password: str) -> Settings:
    """``settings`` logging in as ``name``: with SCRAM-SHA-512 over SASL_PLAINTEXT (the local
    SASL stack) unless ``SEG_KAFKA_EXTRA`` says otherwise."""
    extra = {**SASL_LOGIN, **settings.kafka_extra, "sasl.username": name}
    return settings.model_copy(update={"kafka_extra": extra, "kafka_password": SecretStr(password)})


def login_env(settings: Settings, name: str, password: str) -> dict[str, str]:
    """The ``SEG_*`` environment of a service logging in as ``name`` (see ``login``)."""
    as_name = login(settings, name, password)
    return {"SEG_KAFKA_EXTRA": json.dumps(as_name.kafka_extra), "SEG_KAFKA_PASSWORD": password}


def admin_settings(settings: Settings, secrets_dir: Path | None) -> Settings:
    """``settings`` as the admin step connects: with ``secrets_dir`` and no SASL user of its own,
    as ``admin`` with SCRAM-SHA-512 on SASL_PLAINTEXT (the local SASL stack)."""
    if secrets_dir is None or "sasl.username" in settings.kafka_extra:
        return settings
    password = settings.kafka_password.get_secret_value() if settings.kafka_password else None
    return login(settings, "admin", password or password_of("admin", secrets_dir))


def password_of(name: str, secrets_dir: Path | None) -> str:
    """``$KAFKA_<NAME>_PASSWORD``, else ``<secrets_dir>/<name>.password``."""
    var = f"KAFKA_{name.upper().replace('-', '_')}_PASSWORD"
    value = os.environ.get(var, "")
    if not value and secrets_dir is not None and (secrets_dir / f"{name}.password").is_file():
        value = (secrets_dir / f"{name}.password").read_text().strip()
    if not value:
        raise SystemExit(f"no password for {name}: set {var}"
                         + (f" or write {secrets_dir}/{name}.password" if secrets_dir else ""))
    return value


def upsert_users(admin: AdminClient, passwords: dict[str, str]) -> None:
    """Create or rotate SCRAM-SHA-512 credentials (an existing user's password is replaced)."""
    info = ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, SCRAM_ITERATIONS)
    upserts: list[UserScramCredentialAlteration] = [
        UserScramCredentialUpsertion(name, info, pw.encode()) for name, pw in passwords.items()]
    for name, future in admin.alter_user_scram_credentials(upserts, request_timeout=TIMEOUT_S).items():
        future.result(timeout=TIMEOUT_S)
        print(f"user {name}: SCRAM-SHA-512 credentials set")


def _key(b: AclBinding) -> tuple[object, ...]:
    return (b.restype, b.name, b.resource_pattern_type, b.principal, b.host, b.operation,
            b.permission_type)


def apply_acls(admin: AdminClient, grants: Sequence[Grant]) -> tuple[int, int]:
    """Create every grant and delete any other ACL of the same principals; returns (created,
    removed)."""
    wanted = {_key(g.binding()): g.binding() for g in grants}
    stale: list[AclBinding] = []
    for principal in sorted({g.principal for g in grants}):
        # None matches any name and any host (the stubs say str)
        anything: Any = None
        match = AclBindingFilter(ResourceType.ANY, anything, ResourcePatternType.ANY, f"User:{principal}",
                                 anything, AclOperation.ANY, AclPermissionType.ANY)
        held = admin.describe_acls(match, request_timeout=TIMEOUT_S).result(timeout=TIMEOUT_S)
        stale += [b for b in held if _key(b) not in wanted]
    for future in admin.create_acls(list(wanted.values()), request_timeout=TIMEOUT_S).values():
        future.result(timeout=TIMEOUT_S)
    if stale:
        filters = [AclBindingFilter(b.restype, b.name, b.resource_pattern_type, b.principal, b.host,
                                    b.operation, b.permission_type) for b in stale]
        for future in admin.delete_acls(filters, request_timeout=TIMEOUT_S).values():
            future.result(timeout=TIMEOUT_S)
    return len(wanted), len(stale)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m segmentation.admin", description=__doc__.split("\n")[0])
    parser.add_argument("--secrets-dir", type=Path, default=None,
                        help="directory of <name>.password files (KAFKA_<NAME>_PASSWORD wins)")
    parser.add_argument("--producer", default="producer", help="the producers' principal")
    parser.add_argument("--consumer", default="consumer", help="the consumer service's principal")
    parser.add_argument("--trainer", default="trainer", help="the trainer's principal")
    parser.add_argument("--subscriber", default="subscriber",
                        help=f"the downstream readers' principal (groups {SUBSCRIBER_GROUP_PREFIX}...)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("topics", help="create the missing topics")
    users = sub.add_parser("users", help="create or rotate SCRAM-SHA-512 users")
    users.add_argument("names", nargs="*", help="principals (default: producer consumer trainer subscriber)")
    sub.add_parser("acls", help="apply the least-privilege ACLs (and remove any other)")
    sub.add_parser("plan", help="print the ACLs without connecting")
    sub.add_parser("all", help="topics, users, acls")
    args = parser.parse_args(argv)

    settings = admin_settings(load_settings(), args.secrets_dir)
    principals = {"producer": args.producer, "consumer": args.consumer, "trainer": args.trainer,
                  "subscriber": args.subscriber}
    grants = plan(settings, **principals)
    if args.command == "plan":
        print("\n".join(str(g) for g in grants))
        return 0
    admin = AdminClient(client_common(settings))
    try:
        if args.command in ("topics", "all"):
            created = ensure_topics(settings, TIMEOUT_S)
            print(f"topics created: {', '.join(created) if created else 'none (all exist)'}")
        if args.command in ("users", "all"):
            names = getattr(args, "names", None) or list(principals.values())
            upsert_users(admin, {name: password_of(name, args.secrets_dir) for name in names})
        if args.command in ("acls", "all"):
            retrying(lambda: admin.list_topics(timeout=TIMEOUT_S), "list_topics", 60.0)
            created_n, removed = apply_acls(admin, grants)
            print(f"acls: {created_n} applied, {removed} stale removed")
    except KafkaException as exc:
        print(f"error: Kafka refused the admin step: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
