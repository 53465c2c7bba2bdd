"""Partition bookkeeping for the consume loop: the partitions this member owns and what happens
when they leave (``Membership``), consuming without the error messages, seeking back for a
replay, the offsets a batch stands for, and the synchronous commit (on revoke and on close)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from consumer.scoring import Message as Consumed
from consumer.scoring import coordinates

log = logging.getLogger(__name__)


class Membership:
    """The partitions this member owns, kept by the group's rebalance callbacks.

    On revoke, ``revoke`` first (``Checkpoint.revoke``: the batch in flight committed, and what
    is stored committed at once). On loss nothing is committed. Either way, ``forget`` is told
    which partitions left.
    """

    def __init__(
        self, consumer: Consumer, revoke: Callable[[], None],
        forget: Callable[[list[TopicPartition]], None],
    ) -> None:
        self.consumer = consumer
        self.revoke = revoke
        self.forget = forget
        self.assigned: set[tuple[str, int]] = set()

    def subscribe(self, topic: str) -> None:
        self.consumer.subscribe(
            [topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost,
        )

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.assigned |= {(tp.topic, tp.partition) for tp in partitions}
        log.info("partitions assigned", extra={"partitions": names(partitions)})

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.revoke()  # what is committed is everything acknowledged
        self._leave(partitions)
        log.info("partitions revoked", extra={"partitions": names(partitions)})

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Never commit on loss: another member may already own these partitions.
        self._leave(partitions)
        log.warning("partitions lost", extra={"partitions": names(partitions)})

    def _leave(self, partitions: list[TopicPartition]) -> None:
        self.assigned -= {(tp.topic, tp.partition) for tp in partitions}
        self.forget(partitions)


def consume(consumer: Consumer, size: int, timeout_s: float) -> list[Message]:
    """Up to ``size`` messages within ``timeout_s``, without those that only carry an error."""
    return [m for m in consumer.consume(size, timeout_s) if not is_error(m)]


def is_error(msg: Message) -> bool:
    """True for a message that only carries a consumer error (logged, then dropped); a fatal
    error raises ``KafkaException`` and ends the loop."""
    err = msg.error()
    if err is None:
        return False
    if err.fatal():
        raise KafkaException(err)
    log.warning("consumer error", extra={"error": str(err)})
    return True


def rewind(consumer: Consumer, messages: Sequence[Consumed]) -> None:
    """Seek each partition back to the first offset of ``messages`` (replayed later)."""
    first: dict[tuple[str, int], int] = {}
    for msg in messages:
        topic, partition, offset = coordinates(msg)
        first[(topic, partition)] = min(first.get((topic, partition), offset), offset)
    for (topic, partition), offset in first.items():
        try:
            consumer.seek(TopicPartition(topic, partition, offset))
        except KafkaException as exc:
            log.warning("seek failed", extra={"partition": partition, "error": str(exc)})


def next_offsets(messages: Sequence[Consumed]) -> list[TopicPartition]:
    """Per partition, the offset after the last message (what a commit means).

    >>> class M:
    ...     def __init__(self, p, o): self.p, self.o = p, o
    ...     def topic(self): return "t"
    ...     def partition(self): return self.p
    ...     def offset(self): return self.o
    >>> [(tp.partition, tp.offset) for tp in next_offsets([M(0, 7), M(1, 3), M(0, 5), M(0, 9)])]
    [(0, 10), (1, 4)]
    """
    last: dict[tuple[str | None, int | None], int] = {}
    for msg in messages:  # once per message: plain comparisons, the conversions once per partition
        where, offset = (msg.topic(), msg.partition()), msg.offset() or 0
        if offset > last.get(where, -1):
            last[where] = offset
    return [TopicPartition(str(t), int(p or 0), int(o) + 1) for (t, p), o in last.items()]


def commit_stored(consumer: Consumer) -> None:
    """Commit the stored offsets now (at-least-once); nothing stored yet is not an error."""
    try:
        consumer.commit(asynchronous=False)
    except KafkaException as exc:
        if exc.args[0].code() != KafkaError._NO_OFFSET:
            log.warning("commit failed", extra={"error": str(exc)})


def names(partitions: list[TopicPartition]) -> str:
    """Partitions as one log field.

    >>> names([TopicPartition("events", 0), TopicPartition("events", 3)])
    'events[0],events[3]'
    """
    return ",".join(f"{tp.topic}[{tp.partition}]" for tp in partitions)
