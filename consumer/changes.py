"""Segment changes: a record on the compacted changes topic whenever a customer's segment differs
from the one last recorded for them, with its cause.

The last recorded segment of each customer is state of the input partition the customer's events
arrive on, and the changes topic is that state's changelog (as in Kafka Streams): a change is
written to the partition of the same number as its event, keyed by customer, and compaction keeps
each customer's latest. A member rebuilds a partition's state from the topic the first time it
scores that partition (after an assignment, a restart, or a batch that failed), so a restart or a
rebalance never invents a change. Redis is never the reference: it is a cache and may be emptied.

Its records are produced with the batch's outputs (exactly-once: in the same transaction), and the
state moves on only once the batch before is finished; a batch that fails drops its partitions'
state, which the replay rebuilds from what the topic acknowledged.

Causes (``cause``):

* ``initial``: nothing was recorded for the customer yet (``from_*`` are null);
* ``behaviour``: the model that recorded the last segment would move the customer too: their
  features moved;
* ``model``: that model would still give the recorded segment: a new model moved the customer;
* ``unknown``: that model can no longer be loaded (rare: it is cached and kept in Redis).

A ``model`` change into a segment the new model's retrain created (its label mapping's diff says
``split``, ``merged`` or ``born``) names it: ``to_status`` and ``to_parents`` (the previous
version's ids it came from; none for a birth); otherwise both are null. ``outlier`` repeats the
output record's flag for the event that made the change.

An event older than the newest one seen for its customer (out of order) changes nothing.

The topic is read back as untrusted input (``segmentation.readback``): a record that is not a
change (garbage, nested too deep, too large, a key that is no customer id, a time later than an
input event's could be) is skipped, counted and logged once; the state is what the good records
give.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import msgspec
from confluent_kafka import KafkaException

from consumer.model import ActiveModel
from consumer.scoring import Message, OutRecord, ScoredBatch, coordinates, event_times_iso, json_string
from segmentation.bundle import SegmentDiff
from segmentation.cluster_metrics import nearest_two
from segmentation.domain import ChangeCause
from segmentation.events import Event, event_time_iso
from segmentation.kafka import ReadIncomplete, ReadPosition, TopicReader, read_to_end
from segmentation.metrics import ConsumerMetrics
from segmentation.readback import Readback, ReadbackError, decode_change, key_text

log = logging.getLogger(__name__)

ModelOf = Callable[[int], "ActiveModel | None"]


class Recorded(msgspec.Struct):
    """A customer's last recorded segment, and the newest event time seen for them (moved on in
    place: most events change nothing but it). One per customer held, so a msgspec struct."""

    segment_id: int
    segment: str
    model_version: int
    event_ms: int


@dataclass(frozen=True, slots=True)
class Changes:
    """A batch's change records (each to the partition of its event) and their causes, in order."""

    records: tuple[OutRecord, ...] = ()
    causes: tuple[ChangeCause, ...] = ()


@dataclass(frozen=True, slots=True)
class ChangesConfig:
    """What the changes stage reads of the settings: its topic (None: no changes recorded), how
    long one rebuild call may read (the delivery timeout: a held batch waits no longer), and the
    longest customer id a record's key may be."""

    topic: str | None
    read_budget_s: float
    max_id_chars: int


class ChangesUnavailable(RuntimeError):
    """A partition's recorded segments could not be read from the changes topic."""


def change_value(
    event: Event, event_ms: int, before: Recorded | None, segment_id: int, segment: str,
    version: int, cause: ChangeCause, changed_at: str, outlier: bool = False,
    lineage: SegmentDiff | None = None, event_time: str | None = None,
) -> bytes:
    """The wire contract of a segment change (compact JSON, UTF-8), built as one string like
    ``scoring.output_value`` (a test holds it to ``json.dumps`` of the dict); ``lineage``: the
    diff entry of the segment the change leads into, named only for a ``model`` change;
    ``event_time``: ``event_time_iso(event_ms)`` when the caller formatted it already.

    >>> from segmentation.events import CustomerEvent
    >>> e = CustomerEvent(customer_id="c-1", event_time=1000, event_id="e-9", features={})
    >>> change_value(e, 1000, Recorded(2, "loyal", 4, 0), 3, "lapsed", 5, "model", "T")
    b'{"customer_id":"c-1","event_id":"e-9","event_time":"1970-01-01T00:00:01.000Z","cause":"model","from_segment_id":2,"from_segment":"loyal","from_model_version":4,"to_segment_id":3,"to_segment":"lapsed","to_model_version":5,"to_status":null,"to_parents":null,"outlier":false,"changed_at":"T"}'
    >>> split = SegmentDiff(segment_id=7, status="split", parents=[2])
    >>> import json
    >>> record = json.loads(change_value(e, 1000, Recorded(2, "loyal", 4, 0), 7, "loyal (b)", 5,
    ...                                  "model", "T", outlier=True, lineage=split))
    >>> record["to_status"], record["to_parents"], record["outlier"]
    ('split', [2], True)
    """
    named = lineage if cause == "model" else None
    if before is None:
        came_from = '"from_segment_id":null,"from_segment":null,"from_model_version":null'
    else:
        came_from = (f'"from_segment_id":{int(before.segment_id)},'
                     f'"from_segment":{json_string(before.segment)},'
                     f'"from_model_version":{int(before.model_version)}')
    if named is None:
        lineage_fields = '"to_status":null,"to_parents":null'
    else:
        parents = ",".join(str(int(p)) for p in named.parents)
        lineage_fields = f'"to_status":{json_string(named.status)},"to_parents":[{parents}]'
    return (
        f'{{"customer_id":{json_string(event.customer_id)},"event_id":{json_string(event.event_id)},'
        f'"event_time":"{event_time or event_time_iso(event_ms)}","cause":"{cause}",{came_from},'
        f'"to_segment_id":{int(segment_id)},"to_segment":{json_string(segment)},'
        f'"to_model_version":{int(version)},{lineage_fields},'
        f'"outlier":{"true" if outlier else "false"},"changed_at":{json_string(changed_at)}}}'
    ).encode()


def recorded_of(value: bytes | None, latest_ms: float | None = None) -> Recorded | None:
    """The segment a change record leaves its customer in; None for anything that is not a
    valid change record (``readback.decode_change``; ``latest_ms``: the latest event time it may
    carry, now + the input contract's skew by default).

    >>> recorded_of(b'{"to_segment_id":3,"to_segment":"x","to_model_version":5,'
    ...             b'"event_time":"1970-01-01T00:00:01.000Z"}')
    Recorded(segment_id=3, segment='x', model_version=5, event_ms=1000)
    >>> recorded_of(b'{"to_segment_id":true}'), recorded_of(b'garbage'), recorded_of(None)
    (None, None, None)

    Held to a bundle's bounds (an absurd id or name is never echoed into a change record), and
    to a time with its zone (ours always say Z), no later than an input event's could be:

    >>> recorded_of(b'{"to_segment_id":3,"to_segment":"' + b"x" * 201 + b'","to_model_version":5,'
    ...             b'"event_time":"1970-01-01T00:00:01.000Z"}')
    >>> recorded_of(b'{"to_segment_id":1' + b"0" * 309 + b',"to_segment":"x","to_model_version":5,'
    ...             b'"event_time":"1970-01-01T00:00:01.000Z"}')
    >>> recorded_of(b'{"to_segment_id":3,"to_segment":"x","to_model_version":0,'
    ...             b'"event_time":"1970-01-01T00:00:01.000Z"}')
    >>> recorded_of(b'{"to_segment_id":3,"to_segment":"x","to_model_version":5,'
    ...             b'"event_time":"1970-01-01T00:00:01.000"}')
    >>> recorded_of(b'{"to_segment_id":3,"to_segment":"x","to_model_version":5,'
    ...             b'"event_time":"9999-12-31T00:00:00.000Z"}')
    """
    try:
        change = decode_change(value, Readback().latest_ms() if latest_ms is None else latest_ms)
    except ReadbackError:
        return None
    return Recorded(change.segment_id, change.segment, change.model_version, change.event_ms)


def cause_of(event: Event, before: Recorded, version: int, model_of: ModelOf) -> ChangeCause:
    """Why ``event``'s customer left ``before``: whether the model that recorded it would
    still put them there (``model``) or not (``behaviour``)."""
    if before.model_version == version:
        return "behaviour"
    recorder = model_of(before.model_version)
    if recorder is None:
        return "unknown"
    try:
        x, _ = recorder.bundle.features.encode([event])
        index, _, _ = nearest_two(x, recorder.centroids)
    except Exception:  # noqa: BLE001 - an old model that cannot encode this event proves nothing
        return "unknown"
    return "model" if recorder.bundle.segment_ids[int(index[0])] == before.segment_id else "behaviour"


class SegmentChanges:
    """The last recorded segment per customer of the partitions this member scores, and the
    change records of each batch (``record``). Without a changes topic (``SEG_CHANGES_TOPIC=null``)
    it does nothing."""

    def __init__(self, config: ChangesConfig, open_reader: Callable[[], TopicReader], readback: Readback,
                 metrics: ConsumerMetrics, model_of: ModelOf) -> None:
        self.config = config
        self.topic = config.topic
        self.open_reader = open_reader
        self.metrics = metrics
        self.model_of = model_of
        self.readback = readback
        self.state: dict[int, dict[str, Recorded]] = {}
        # a rebuild cut off by its time budget: what it read so far, and where it goes on
        self._partial: dict[int, dict[str, Recorded]] = {}
        self._positions: dict[int, ReadPosition] = {}
        self._reader: TopicReader | None = None

    def record(self, messages: Sequence[Message], batch: ScoredBatch, model: ActiveModel) -> Changes | None:
        """The batch's changes, against the state the batches before left; None (logged) when a
        partition's state cannot be rebuilt: the batch must wait, since no change may be
        detected against a state not rebuilt."""
        if self.topic is None:
            return Changes()
        try:
            self.prepare(messages)
        except ChangesUnavailable as exc:
            log.warning("segment changes unavailable; batch held", extra={"error": str(exc)})
            return None
        return self.detect(batch, model, event_time_iso(int(time.time() * 1000)))

    # --- state of the partitions held --------------------------------------------------------
    def prepare(self, messages: Sequence[Message]) -> None:
        """Rebuild the state of the partitions of ``messages`` not held yet;
        ``ChangesUnavailable`` when the topic cannot be read to the end (the batch must wait).

        A rebuild reads for at most ``SEG_DELIVERY_TIMEOUT_S`` per call; one cut off keeps what it
        read and where it stopped, and the next call goes on from there (the batch is held and
        replayed meanwhile, and the member keeps polling): a partition of any size is rebuilt,
        with its progress logged, instead of starting again at every deadline."""
        missing = sorted({coordinates(m)[1] for m in messages} - set(self.state))
        if not missing or self.topic is None:
            return
        started = time.monotonic()
        try:
            self._read(missing)
        except (KafkaException, ReadIncomplete) as exc:
            self.metrics.change_restores.labels("failed").inc()
            log.info("segment change state rebuild in progress", extra={"progress": {
                p: f"{self._positions[p].next}/{self._positions[p].end}"
                for p in missing if p in self._positions}})
            raise ChangesUnavailable(f"{self.topic} {missing}: {exc}") from exc
        restored = {p: self._partial.pop(p, {}) for p in missing}
        for p in missing:
            self._positions.pop(p, None)
        self.state.update(restored)
        self.metrics.change_restores.labels("done").inc()
        self.metrics.change_restore_duration.observe(time.monotonic() - started)
        self._count_customers()
        log.info("segment change state rebuilt", extra={
            "partitions": missing, "customers": sum(len(restored[p]) for p in missing),
            "seconds": round(time.monotonic() - started, 3)})

    def _read(self, partitions: list[int]) -> None:
        """Read ``partitions`` on from ``_positions`` into ``_partial`` (``read_to_end``)."""
        assert self.topic is not None  # noqa: S101 - prepare reads only with a topic
        if self._reader is None:
            self._reader = self.open_reader()
        for p in partitions:
            self._partial.setdefault(p, {})
        latest = self.readback.latest_ms()
        invalid = 0
        try:
            for msg in read_to_end(self._reader, self.topic, partitions, self.config.read_budget_s,
                                   self._positions):
                partition = int(msg.partition() or 0)
                try:
                    customer, recorded = self._decoded(msg, latest)
                except ReadbackError as exc:
                    invalid += 1
                    self.readback.rejected("changes_topic", f"{self.topic}/{partition}@{msg.offset()}", exc)
                    continue
                self._partial[partition][customer] = recorded
        finally:
            if invalid:
                self.metrics.change_records_invalid.inc(invalid)

    def _decoded(self, msg: Message, latest_ms: float) -> tuple[str, Recorded]:
        """A record's customer (its key, as the outputs key it) and what it leaves them in."""
        customer = key_text(msg.key(), self.config.max_id_chars)
        change = decode_change(msg.value(), latest_ms)
        return customer, Recorded(change.segment_id, change.segment, change.model_version, change.event_ms)

    def forget(self, partitions: Iterable[int]) -> None:
        """Drop the state of ``partitions`` (revoked, lost, or their batch failed): it is
        rebuilt from the topic when they are scored again."""
        for p in partitions:
            self.state.pop(p, None)
            self._partial.pop(p, None)
            self._positions.pop(p, None)
        self._count_customers()

    def forget_messages(self, messages: Sequence[Message]) -> None:
        self.forget({coordinates(m)[1] for m in messages})

    def _count_customers(self) -> None:
        self.metrics.change_state_customers.set(sum(len(s) for s in self.state.values()))

    # --- detection ---------------------------------------------------------------------------
    def detect(self, batch: ScoredBatch, model: ActiveModel, changed_at: str) -> Changes:
        """Record every scored event's segment; a change record per customer whose segment
        differs from the one recorded. Call ``prepare`` first for the batch's partitions."""
        version = model.version
        late = 0
        changed: list[tuple[int, int, Recorded | None, ChangeCause]] = []  # row, partition, before, cause
        rows = zip(batch.outputs, batch.customers, batch.events, strict=True)
        for row, (output, customer, event) in enumerate(rows):
            partition = int(output.source.partition() or 0) if output.source is not None else 0
            state = self.state[partition]
            before = state.get(customer.customer_id)
            if before is not None:
                if customer.event_ms < before.event_ms:
                    late += 1
                    continue
                if before.segment_id == customer.segment_id:
                    before.event_ms = customer.event_ms
                    continue
            cause: ChangeCause = ("initial" if before is None
                                  else cause_of(event, before, version, self.model_of))
            state[customer.customer_id] = Recorded(customer.segment_id, customer.segment, version,
                                                   customer.event_ms)
            changed.append((row, partition, before, cause))
        if late:
            self.metrics.change_late_events.inc(late)
        if not changed:
            return Changes()
        self._count_customers()
        return Changes(self._records(batch, model, changed, changed_at), tuple(c[3] for c in changed))

    def _records(self, batch: ScoredBatch, model: ActiveModel,
                 changed: list[tuple[int, int, Recorded | None, ChangeCause]], changed_at: str,
                 ) -> tuple[OutRecord, ...]:
        """The change records of the ``changed`` rows (their event times formatted together)."""
        outliers = batch.outliers.tolist() if batch.outliers.shape[0] else [False] * len(batch.outputs)
        times = event_times_iso([batch.customers[row].event_ms for row, _, _, _ in changed])
        records = []
        for (row, partition, before, cause), event_time in zip(changed, times, strict=True):
            output, customer = batch.outputs[row], batch.customers[row]
            value = change_value(batch.events[row], customer.event_ms, before, customer.segment_id,
                                 customer.segment, model.version, cause, changed_at, outliers[row],
                                 model.lineage.get(customer.segment_id), event_time)
            records.append(OutRecord(str(self.topic), output.key, value, [], output.source, partition))
        return tuple(records)

    def close(self) -> None:
        if self._reader is not None:
            try:
                self._reader.close()
            except KafkaException as exc:
                log.warning("changes reader close failed", extra={"error": str(exc)})
            self._reader = None
