"""Delivery guarantees: outputs and dead letters first, then the input offsets.

* ``AtLeastOnce``: produce, wait for every acknowledgement, then *store* the offsets; librdkafka
  auto-commits stored offsets on an interval (and the loop commits on revoke). A crash before
  the store replays the batch: duplicates are possible, losses are not.
* ``ExactlyOnce``: outputs, dead letters and the input offsets in one Kafka transaction.
  Subscribers must read with ``isolation.level=read_committed``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Protocol

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from consumer.scoring import OutRecord

log = logging.getLogger(__name__)


class DeliveryFailed(RuntimeError):
    """The batch was not fully acknowledged; its offsets were not stored or committed."""


class Delivery(Protocol):
    def deliver(self, records: Sequence[OutRecord], offsets: Sequence[TopicPartition]) -> None: ...
    def close(self, timeout_s: float) -> None: ...


def _produce_all(
    producer: Producer, records: Sequence[OutRecord],
    on_delivery: Callable[[KafkaError | None, Message], None] | None,
) -> None:
    for r in records:
        while True:
            try:
                producer.produce(r.topic, key=r.key, value=r.value, headers=r.headers or None,
                                 on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.05)  # local queue full: serve delivery reports, then retry


class AtLeastOnce:
    def __init__(self, producer: Producer, consumer: Consumer, ack_timeout_s: float) -> None:
        self.producer = producer
        self.consumer = consumer
        self.ack_timeout_s = ack_timeout_s

    def deliver(self, records: Sequence[OutRecord], offsets: Sequence[TopicPartition]) -> None:
        errors: list[KafkaError] = []

        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                errors.append(err)

        _produce_all(self.producer, records, on_delivery)
        pending = self.producer.flush(self.ack_timeout_s)
        if pending or errors:
            raise DeliveryFailed(f"{pending} unacknowledged, errors: {errors[:3]}")
        try:
            self.consumer.store_offsets(offsets=list(offsets))
        except KafkaException as exc:
            # A partition revoked meanwhile: its new owner replays from the last commit.
            log.warning("offsets not stored", extra={"error": str(exc)})

    def close(self, timeout_s: float) -> None:
        self.producer.flush(timeout_s)


class ExactlyOnce:
    def __init__(self, producer: Producer, consumer: Consumer, timeout_s: float) -> None:
        self.producer = producer
        self.consumer = consumer
        self.timeout_s = timeout_s
        producer.init_transactions(timeout_s)

    def deliver(self, records: Sequence[OutRecord], offsets: Sequence[TopicPartition]) -> None:
        self.producer.begin_transaction()
        try:
            _produce_all(self.producer, records, None)
            self.producer.send_offsets_to_transaction(
                list(offsets), self.consumer.consumer_group_metadata(), self.timeout_s
            )
            self._commit()
        except KafkaException as exc:
            error: KafkaError = exc.args[0]
            if error.fatal():
                raise  # fenced or otherwise unusable producer: the process must restart
            self.producer.abort_transaction(self.timeout_s)
            raise DeliveryFailed(f"transaction aborted: {error}") from exc

    def _commit(self) -> None:
        for _ in range(3):
            try:
                self.producer.commit_transaction(self.timeout_s)
                return
            except KafkaException as exc:
                if not exc.args[0].retriable():
                    raise
        self.producer.commit_transaction(self.timeout_s)

    def close(self, timeout_s: float) -> None:
        self.producer.flush(timeout_s)
