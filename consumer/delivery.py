"""Delivery guarantees: outputs and dead letters first, then the input offsets.

* ``AtLeastOnce``: produce, wait for every acknowledgement, then *store* the offsets; librdkafka
  auto-commits stored offsets on an interval (and the loop commits on revoke). A crash before
  the store replays the batch: duplicates are possible, losses are not.
* ``ExactlyOnce``: outputs, dead letters and the input offsets in one Kafka transaction.
  Subscribers must read with ``isolation.level=read_committed``.

Errors follow one policy (``classify``), in both modes:

* **retry**: transient (broker down, leader moving, timeouts). Only the records not yet
  acknowledged are produced again, and only after the previous attempt's delivery reports are
  all in (no second copy while the first is in flight), with exponential backoff, for at most
  ``timeout_s``; then ``DeliveryFailed`` and the loop replays the batch, skipping the sources
  whose records were acknowledged.
* **record**: this one record can never be written (too large for the broker, invalid). It is
  replaced by a dead letter of its source (``substitute``); the rest of the batch goes on.
* **stop**: the client cannot write at all (topic missing, not authorised, fenced). ``DeliveryStopped``:
  the consumer exits non-zero with one log line and the batch's offsets uncommitted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from consumer.scoring import OutRecord, coordinates
from segmentation.kafka import Backoff

log = logging.getLogger(__name__)

Source = tuple[str, int, int]
Substitute = Callable[[OutRecord, KafkaError], "OutRecord | None"]
Outcome = Literal["retry", "record", "stop"]
MISSING_TOPIC = frozenset({KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC})
IN_PROGRESS = frozenset({KafkaError._CONFLICT, KafkaError._TIMED_OUT, KafkaError._PREV_IN_PROGRESS})

RECORD_ERRORS = frozenset({
    KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE, KafkaError.INVALID_RECORD,
    KafkaError.INVALID_TIMESTAMP, KafkaError.UNSUPPORTED_FOR_MESSAGE_FORMAT,
})
STOP_ERRORS = frozenset({
    KafkaError._UNKNOWN_TOPIC, KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_PARTITION,
    KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED, KafkaError._FENCED, KafkaError.PRODUCER_FENCED,
    KafkaError.INVALID_PRODUCER_EPOCH, KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED,
    KafkaError.POLICY_VIOLATION, KafkaError._INVALID_ARG,
})


def classify(error: KafkaError) -> Outcome:
    """What to do about one delivery error.

    >>> classify(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
    'record'
    >>> classify(KafkaError(KafkaError._MSG_TIMED_OUT))
    'retry'
    >>> classify(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED))
    'stop'
    """
    if error.fatal() or error.code() in STOP_ERRORS:
        return "stop"
    if error.code() in RECORD_ERRORS:
        return "record"
    return "retry"


class DeliveryFailed(RuntimeError):
    """Transient errors outlasted the delivery timeout; offsets were not stored or committed.
    ``acknowledged`` names the sources whose records are written (a replay must skip them)."""

    def __init__(self, message: str, acknowledged: frozenset[Source] = frozenset()) -> None:
        super().__init__(message)
        self.acknowledged = acknowledged


class DeliveryStopped(RuntimeError):
    """The producer cannot write at all; the consumer must stop (offsets uncommitted)."""


@dataclass
class Sent:
    """A batch handed to the producer: its acknowledgements may still be on their way."""

    records: list[OutRecord]
    offsets: list[TopicPartition]
    substitute: Substitute
    failed: list[tuple[OutRecord, KafkaError]] = field(default_factory=list)
    done: bool = False  # every record acknowledged (exactly-once: committed, offsets included)


class Delivery(Protocol):
    def deliver(self, records: Sequence[OutRecord], offsets: Sequence[TopicPartition],
                substitute: Substitute) -> None: ...
    def send(self, records: Sequence[OutRecord], offsets: Sequence[TopicPartition],
             substitute: Substitute) -> Sent: ...
    def complete(self, sent: Sent) -> None: ...
    def store(self, sent: Sent) -> None: ...
    def close(self, timeout_s: float) -> None: ...


EXIT_STALLED = 5
SEND_OFFSETS_TIMEOUT_S = 30.0
STALL_GRACE_S = 15.0  # past its own timeout, how long a call may run before it counts as stuck
# Producers replaced after a stuck call, per process: each leaves a thread (and the handle it holds)
# blocked inside librdkafka, so past this many the process exits (a restart frees them).
MAX_PRODUCER_REPLACEMENTS = 3


def _exit_stalled(call: str) -> None:
    log.error("stopping: a Kafka client call ignored its timeout; exiting so that a restart "
              "replays the uncommitted batch", extra={"call": call})
    logging.shutdown()
    os._exit(EXIT_STALLED)


def _stop_if_missing(producer: Producer, topics: set[str]) -> None:
    """``DeliveryStopped`` when the broker says one of ``topics`` does not exist (a transient
    metadata error proves nothing and is ignored)."""
    for topic in sorted(topics):
        try:
            described = producer.list_topics(topic, timeout=5).topics.get(topic)
        except KafkaException:
            continue
        error = None if described is None else described.error
        if described is None or (error is not None and error.code() in MISSING_TOPIC):
            raise DeliveryStopped(f"cannot write to {topic}: the topic does not exist")


def _replace_or_stop(record: OutRecord, error: KafkaError, substitute: Substitute) -> OutRecord:
    replacement = substitute(record, error)
    if replacement is None:
        raise DeliveryStopped(f"{record.topic}: even a stripped dead letter was refused: {error.str()}")
    log.warning("record refused by the broker; dead-lettered",
                extra={"topic": record.topic, "error": error.str()})
    return replacement


def _produce(
    producer: Producer, record: OutRecord,
    on_delivery: Callable[[KafkaError | None, Message], None] | None,
) -> KafkaError | None:
    """Enqueue one record; returns the error when librdkafka refuses it at once."""
    while True:
        try:
            if record.partition is None:
                producer.produce(record.topic, key=record.key, value=record.value,
                                 headers=record.headers or None, on_delivery=on_delivery)
            else:
                producer.produce(record.topic, key=record.key, value=record.value,
                                 partition=record.partition, headers=record.headers or None,
                                 on_delivery=on_delivery)
            return None
        except BufferError:
            producer.poll(0.05)  # local queue full: serve delivery reports, then retry
        except KafkaException as exc:
            return exc.args[0]


def _sources(records: Sequence[OutRecord]) -> frozenset[Source]:
    return frozenset(coordinates(r.source) for r in records if r.source is not None)


def _await_reports(producer: Producer) -> None:
    """Every queued record gets its delivery report within message.timeout.ms."""
    while producer.flush(1.0) > 0:
        pass


class AtLeastOnce:
    """``send`` produces a batch and returns at once; ``complete`` waits for its reports and
    retries what failed; ``store`` then stores its offsets. The loop sends batch n+1 only after
    completing batch n and stores offsets batch after batch, so acknowledgements overlap the
    scoring of the next batch while every offset stored is in order and acknowledged."""

    def __init__(self, producer: Producer, consumer: Consumer, timeout_s: float) -> None:
        self.producer = producer
        self.consumer = consumer
        self.timeout_s = timeout_s

    def deliver(self, records: Sequence[OutRecord], offsets: Sequence[TopicPartition],
                substitute: Substitute) -> None:
        sent = self.send(records, offsets, substitute)
        self.complete(sent)
        self.store(sent)

    def send(self, records: Sequence[OutRecord], offsets: Sequence[TopicPartition],
             substitute: Substitute) -> Sent:
        sent = Sent(list(records), list(offsets), substitute)
        self._produce_all(sent.records, sent)
        self.producer.poll(0)  # serve reports already in, so the queue never grows unbounded
        return sent

    def complete(self, sent: Sent) -> None:
        if sent.done:
            return
        backoff = Backoff(self.timeout_s)
        while True:
            _await_reports(self.producer)
            pending = self._to_retry(sent)
            if not pending:
                break
            if not backoff.wait():
                _stop_if_missing(self.producer, {r.topic for r in pending})
                raise DeliveryFailed(
                    f"{len(pending)} records unacknowledged after {self.timeout_s:g}s",
                    _sources(sent.records) - _sources(pending),
                )
            self._produce_all(pending, sent)
        sent.done = True

    def store(self, sent: Sent) -> None:
        """Store the offsets of a completed batch (librdkafka commits them on its interval)."""
        if not sent.done:
            raise ValueError("offsets are stored only once their batch is acknowledged")
        try:
            self.consumer.store_offsets(offsets=sent.offsets)
        except KafkaException as exc:
            # A partition revoked meanwhile: its new owner replays from the last commit.
            log.warning("offsets not stored", extra={"error": str(exc)})

    def _produce_all(self, records: list[OutRecord], sent: Sent) -> None:
        """Produce ``records`` once; their reports land in ``sent``."""
        for record in records:
            # Only failures are reported (the producer's ``delivery.report.only.error``) and
            # kept: once every record is out of the producer's queue, the rest is acknowledged.
            def on_delivery(err: KafkaError | None, _msg: Message, record: OutRecord = record) -> None:
                if err is not None:
                    sent.failed.append((record, err))

            error = _produce(self.producer, record, on_delivery)
            if error is not None:
                sent.failed.append((record, error))

    def _to_retry(self, sent: Sent) -> list[OutRecord]:
        """Once every report is in: the records to produce again (dead letters in place of those
        refused for good); ``DeliveryStopped`` when the client cannot write at all."""
        failed, sent.failed = sent.failed, []
        again: list[OutRecord] = []
        for record, error in failed:
            outcome = classify(error)
            if outcome == "stop":
                raise DeliveryStopped(f"cannot write to {record.topic}: {error.str()}")
            if outcome == "record":
                again.append(_replace_or_stop(record, error, sent.substitute))
            else:
                again.append(record)
        if failed:
            log.warning("delivery errors; retrying the unacknowledged records",
                        extra={"records": len(again), "error": failed[0][1].str()})
        return again

    def close(self, timeout_s: float) -> None:
        self.producer.flush(timeout_s)


class ExactlyOnce:
    """One transaction per batch: outputs, dead letters, changes and the input offsets.
    ``new_producer`` makes a producer with the same transactional id, to replace one stuck in a
    call that ignores its timeout (``_send_offsets``); without it, a stuck call exits the process."""

    def __init__(self, producer: Producer, consumer: Consumer, timeout_s: float,
                 new_producer: Callable[[], Producer] | None = None) -> None:
        self.producer = producer
        self.consumer = consumer
        self.timeout_s = timeout_s
        self.new_producer = new_producer
        self.replaced = 0  # producers replaced after a stuck call
        producer.init_transactions(timeout_s)

    def send(self, records: Sequence[OutRecord], offsets: Sequence[TopicPartition],
             substitute: Substitute) -> Sent:
        """The whole transaction, committed before it returns: nothing overlaps in this mode."""
        self.deliver(records, offsets, substitute)
        return Sent(list(records), list(offsets), substitute, done=True)

    def complete(self, sent: Sent) -> None:
        """Nothing left to do: ``send`` committed the transaction."""

    def store(self, sent: Sent) -> None:
        """Nothing: the offsets were committed in the transaction."""

    def deliver(self, records: Sequence[OutRecord], offsets: Sequence[TopicPartition],
                substitute: Substitute) -> None:
        batch = list(records)
        backoff = Backoff(self.timeout_s)
        topics = {r.topic for r in batch}
        while True:
            try:
                refused = self._transaction(batch, offsets)
            except DeliveryFailed:
                _stop_if_missing(self.producer, topics)
                raise
            if refused is None:
                return
            if refused:  # replace what the broker refused, then write the whole batch again
                batch = [_replace_or_stop(r, refused[id(r)], substitute) if id(r) in refused else r
                         for r in batch]
                continue
            # inside a transaction a deleted topic only shows as timeouts: ask the metadata
            _stop_if_missing(self.producer, topics)
            if not backoff.wait():
                raise DeliveryFailed(f"transaction not committed after {self.timeout_s:g}s")

    def _transaction(
        self, batch: list[OutRecord], offsets: Sequence[TopicPartition]
    ) -> dict[int, KafkaError] | None:
        """One attempt: ``None`` when committed; otherwise aborted, with the records the broker
        refused for good (by ``id``; empty when the failure was transient)."""
        refused: dict[int, KafkaError] = {}
        try:
            self.producer.begin_transaction()
            for record in batch:
                def on_delivery(err: KafkaError | None, _msg: Message, record: OutRecord = record) -> None:
                    if err is not None and classify(err) == "record":
                        refused[id(record)] = err

                error = _produce(self.producer, record, on_delivery)
                if error is not None and classify(error) == "record":
                    refused[id(record)] = error
                elif error is not None:
                    raise KafkaException(error)
            if refused:
                self._abort()
                return refused
            self._send_offsets(offsets)
            self._until_done(lambda: self.producer.commit_transaction(self.timeout_s))
            return None
        except KafkaException as exc:
            failure: KafkaError = exc.args[0]
            if classify(failure) == "stop":
                raise DeliveryStopped(f"transaction impossible: {failure.str()}") from None
            log.warning("transaction aborted", extra={"error": failure.str()})
            self._abort()
            return refused

    def _send_offsets(self, offsets: Sequence[TopicPartition]) -> None:
        """``send_offsets_to_transaction`` can ignore its timeout for good once the group
        coordinator has gone away (a broker restart; confluentinc/librdkafka#5456), and nothing
        recovers that handle. So the call runs in a thread of its own; past its timeout and a
        grace the producer is replaced (``_replace``) and the batch fails, to be replayed from
        the committed offsets: nothing of it was committed."""
        producer, metadata = self.producer, self.consumer.consumer_group_metadata()
        done, failed = threading.Event(), []

        def call() -> None:
            try:
                producer.send_offsets_to_transaction(list(offsets), metadata, SEND_OFFSETS_TIMEOUT_S)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                failed.append(exc)
            finally:
                done.set()

        threading.Thread(target=call, name="send-offsets", daemon=True).start()
        if not done.wait(SEND_OFFSETS_TIMEOUT_S + STALL_GRACE_S):
            self._replace(producer, "send_offsets_to_transaction")
        if failed:
            raise failed[0]

    def _replace(self, stuck: Producer, call: str) -> None:
        """Leave ``stuck`` to the thread blocked in it and go on with a new producer of the
        same transactional id: its ``init_transactions`` fences ``stuck`` and aborts the open
        transaction. ``DeliveryFailed`` (the batch is replayed); the process exits instead when
        there is no ``new_producer``, after ``MAX_PRODUCER_REPLACEMENTS``, or when the new
        producer cannot start its transactions either."""
        if self.new_producer is None or self.replaced >= MAX_PRODUCER_REPLACEMENTS:
            _exit_stalled(call)
            return  # only when _exit_stalled is replaced (tests)
        log.error("a Kafka client call ignored its timeout; replacing the producer (the same "
                  "transactional id fences the stuck one) and replaying the batch",
                  extra={"call": call, "replaced": self.replaced + 1})
        producer = self.new_producer()
        try:
            producer.init_transactions(self.timeout_s)
        except KafkaException as exc:
            log.error("the replacement producer cannot start transactions",
                      extra={"error": exc.args[0].str() if exc.args else str(exc)})
            _exit_stalled(f"init_transactions after {call}")
            return
        self.replaced += 1
        self.producer = producer
        raise DeliveryFailed(f"{call} stalled past {SEND_OFFSETS_TIMEOUT_S + STALL_GRACE_S:g}s: "
                             "producer replaced, batch replayed")

    def _until_done(self, call: Callable[[], object]) -> None:
        """A transaction call that timed out, or collides with the same call still running in
        the background (``_CONFLICT``), is called again: it resumes rather than restarts."""
        backoff = Backoff(self.timeout_s)
        while True:
            try:
                call()
                return
            except KafkaException as exc:
                error: KafkaError = exc.args[0]
                again = error.retriable() or error.code() in IN_PROGRESS
                if error.fatal() or error.txn_requires_abort() or not again or not backoff.wait():
                    raise

    def _abort(self) -> None:
        try:
            self._until_done(lambda: self.producer.abort_transaction(self.timeout_s))
        except KafkaException as exc:
            error: KafkaError = exc.args[0]
            if error.fatal() or classify(error) == "stop":
                raise DeliveryStopped(f"transaction cannot be aborted: {error.str()}") from None
            if error.code() == KafkaError._STATE:
                return  # no transaction in progress (begin failed): nothing to abort
            raise DeliveryFailed(f"abort failed: {error.str()}") from None

    def close(self, timeout_s: float) -> None:
        """Abort a transaction left open by a failure (best effort: otherwise the coordinator
        holds it, and the group's offsets, until transaction.timeout.ms), then flush."""
        with contextlib.suppress(KafkaException):
            self.producer.abort_transaction(min(timeout_s, 10.0))
        self.producer.flush(timeout_s)
