"""The output contracts: what subscribers read from the service's topics, as pydantic models with
generated JSON Schemas (committed in ``segmentation/schemas/``; ``make schema`` regenerates them, a
test fails if one is stale, others check that the records the code builds validate).

* ``AssignmentRecord``: the value of a record on ``customer-segments`` (``SEG_SEGMENTS_TOPIC``);
  key = ``customer_id``. Built for speed as one string (``consumer.scoring.output_value``).
* ``SegmentChange``: the value of a record on ``customer-segment-changes`` (``SEG_CHANGES_TOPIC``);
  key = ``customer_id`` (``consumer.changes.change_value``).
* ``DeadLetterHeaders``: the headers the service adds to a dead letter on ``customer-events-dlq``
  (``SEG_DLQ_TOPIC``), whose key and value are the original message's bytes
  (``consumer.scoring.dead_letter``).
* ``CurrentRecord``, ``PinnedRecord``, ``ReservedRecord`` and ``ModelBundle`` (keys ``v<N>`` and
  ``challenger``): the records of the compacted models topic ``segment-models``, by key
  (``segmentation.model_log``; ``MODELS_TOPIC_RECORDS``).

Readers should ignore fields they do not know: fields may be added; none is removed or changes
meaning without a version bump.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from segmentation.bundle import MAX_NAME_CHARS, SEGMENT_ID_LIMIT, ModelBundle
from segmentation.domain import ChangeCause
from segmentation.events import REASON_MEANINGS
from segmentation.model_log import CHALLENGER, CURRENT, PINNED, RESERVED

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"
DRAFT = "https://json-schema.org/draft/2020-12/schema"

# The times the service writes: UTC, milliseconds, ``Z`` (``segmentation.events.event_time_iso``).
UTC_MS_PATTERN = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z$"
DECIMAL_PATTERN = r"^(0|[1-9][0-9]*)$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"

UtcMs = Annotated[str, Field(pattern=UTC_MS_PATTERN, json_schema_extra={"format": "date-time"})]
CustomerId = Annotated[str, Field(min_length=1, description=(
    "the input event's customer_id, as sent (at most SEG_MAX_ID_CHARS characters, 256 by default);"
    " the record's key as well (UTF-8)"))]
EventId = Annotated[str | None, Field(description=(
    "the input event's event_id, as sent (at most SEG_MAX_ID_CHARS characters); null when the"
    " event had none"))]
SegmentId = Annotated[int, Field(ge=0, lt=SEGMENT_ID_LIMIT)]
SegmentName = Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)]
Version = Annotated[int, Field(ge=1)]
DecimalText = Annotated[str, Field(pattern=DECIMAL_PATTERN)]
# Kafka headers hold bytes; the service writes every dlq.* value as UTF-8 text.
HeaderText = Annotated[str, Field(max_length=1000)]

DeadLetterReason = Literal[
    "not_json", "not_object", "missing_field", "wrong_type", "bad_event_time", "key_mismatch",
    "missing_feature", "non_finite", "out_of_range", "too_large", "too_long",
    "event_time_out_of_range", "internal_error", "output_rejected",
]
# A segment a retrain created, as a change into it names it (``consumer.watcher``).
NewSegmentStatus = Literal["split", "merged", "born"]

_RECORD = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)


def _absent_not_null(schema: dict[str, Any], extra: dict[str, Any]) -> None:
    """An optional header is absent, never null: its schema is the text's alone, without default."""
    for name, prop in schema["properties"].items():
        if name not in schema.get("required", ()) and "anyOf" in prop:
            prop.update(next(p for p in prop.pop("anyOf") if p != {"type": "null"}))
            prop.pop("default", None)
    schema.update(extra)


def _reasons_described() -> str:
    return "; ".join(f"{reason}: {meaning}" for reason, meaning in REASON_MEANINGS.items())


class AssignmentRecord(BaseModel):
    """The value of a record on `customer-segments`: one per scored event, keyed by
    `customer_id`; compact JSON (UTF-8), fields in this order. Every input event is either
    scored (one of these) or dead-lettered, never both."""

    model_config = ConfigDict(
        **_RECORD,
        json_schema_extra={"examples": [{
            "customer_id": "c-1042", "event_id": "e-88231", "event_time": "2026-11-29T10:15:00.000Z",
            "segment_id": 2, "segment": "segment 2: high monetary_90d, high frequency_90d",
            "distance": 0.4213, "outlier": False, "model_version": 7,
            "scored_at": "2026-11-29T10:15:00.120Z",
        }]},
    )

    customer_id: CustomerId
    event_id: EventId
    event_time: UtcMs = Field(description="the input event's event_time, in UTC to the millisecond")
    segment_id: SegmentId = Field(description=(
        "the segment's id: stable across retrains (a segment the trainer matches to a previous"
        " one keeps its id) and never reused for another segment"))
    segment: SegmentName = Field(description="the segment's business name (may change with a retrain)")
    distance: float = Field(ge=0, allow_inf_nan=False, description=(
        "Euclidean distance to the segment's centroid in the model's scaled space, rounded to 6"
        " decimals"))
    outlier: bool = Field(description=(
        "true when the distance is beyond the segment's outlier radius or a raw feature lies"
        " outside the training envelope; the event is still assigned its nearest segment. Always"
        " false under a model trained without radii"))
    model_version: Version = Field(description="the version of the model that scored the event")
    scored_at: UtcMs = Field(description="when the consumer scored the event's batch (its clock, UTC)")


class SegmentChange(BaseModel):
    """The value of a record on the compacted `customer-segment-changes`: written whenever a
    customer's segment differs from the one last recorded for them, keyed by `customer_id`, on
    the partition of the same number as the input event's. Compact JSON (UTF-8), fields in this
    order. Compaction keeps each customer's latest change (after a week)."""

    model_config = ConfigDict(
        **_RECORD,
        json_schema_extra={"examples": [{
            "customer_id": "c-1", "event_id": "e-9", "event_time": "2026-11-29T10:15:00.000Z",
            "cause": "model", "from_segment_id": 2, "from_segment": "loyal", "from_model_version": 4,
            "to_segment_id": 7, "to_segment": "loyal (b)", "to_model_version": 5, "to_status": "split",
            "to_parents": [2], "outlier": False, "changed_at": "2026-11-29T10:15:00.120Z",
        }]},
    )

    customer_id: CustomerId
    event_id: EventId
    event_time: UtcMs = Field(description="the time of the input event that made the change, UTC")
    cause: ChangeCause = Field(description=(
        "initial: nothing was recorded for the customer yet (every from_* is null); behaviour:"
        " the model that recorded the previous segment would move the customer too (their"
        " features moved); model: that model would still give the previous segment (a new model"
        " moved the customer); unknown: that model can no longer be loaded"))
    from_segment_id: SegmentId | None = Field(description="the previous segment's id; null for initial")
    from_segment: SegmentName | None = Field(description="the previous segment's name; null for initial")
    from_model_version: Version | None = Field(description=(
        "the version that recorded the previous segment; null for initial"))
    to_segment_id: SegmentId = Field(description="the new segment's id (as in the output record)")
    to_segment: SegmentName = Field(description="the new segment's name")
    to_model_version: Version = Field(description="the version that assigned the new segment")
    to_status: NewSegmentStatus | None = Field(description=(
        "for a model change into a segment that retrain created: split, merged or born (the"
        " version's label-mapping diff); null otherwise (another cause, a kept or drifted segment)"))
    to_parents: list[SegmentId] | None = Field(description=(
        "with to_status: the previous version's segment ids it came from (empty for born); null"
        " when to_status is"))
    outlier: bool = Field(description="the output record's outlier flag for the event that made the change")
    changed_at: UtcMs = Field(description="when the consumer detected the change (its clock, UTC)")

    @model_validator(mode="after")
    def _consistent(self) -> SegmentChange:
        previous = (self.from_segment_id, self.from_segment, self.from_model_version)
        if (self.cause == "initial") != all(p is None for p in previous):
            raise ValueError("from_* are null exactly when the cause is initial")
        if any(p is None for p in previous) and not all(p is None for p in previous):
            raise ValueError("from_* are all null or all set")
        if (self.to_status is None) != (self.to_parents is None):
            raise ValueError("to_status and to_parents are both null or both set")
        if self.to_status is not None and self.cause != "model":
            raise ValueError("to_status is set only for a model change")
        return self


class DeadLetterHeaders(BaseModel):
    """The headers the service adds to a dead letter on `customer-events-dlq`, as an object of
    header name to value (Kafka header values are bytes: these are UTF-8 text). The dead letter's
    key and value are the original message's, byte for byte, unless `dlq.truncated` says they
    are prefixes; without key and value (a copy the broker refused, stripped) the
    `dlq.original.*` headers say what they were. The original message's own headers come first,
    copied (as many as fit in 16 KiB, without `dlq.*` ones: `dlq.headers.dropped` counts those left
    out), and are not described here: the service's headers follow them, and every `dlq.*` header
    is the service's own, about this rejection. A header this service does not write for a dead
    letter is absent (never empty or null)."""

    model_config = ConfigDict(
        **_RECORD,
        json_schema_extra=lambda schema, _: _absent_not_null(schema, {"examples": [{
            "dlq.reason": "missing_feature", "dlq.detail": "features.monetary_90d is required",
            "dlq.source.topic": "customer-events", "dlq.source.partition": "3",
            "dlq.source.offset": "81723",
        }]}),
    )

    reason: DeadLetterReason = Field(alias="dlq.reason", description=(
        "why the message was dead-lettered: " + _reasons_described()))
    detail: HeaderText = Field(alias="dlq.detail", description=(
        "for people, e.g. 'features.monetary_90d is required' (at most 1000 characters)"))
    source_topic: str = Field(alias="dlq.source.topic", min_length=1, max_length=255,
                              description="the topic the message was consumed from")
    source_partition: DecimalText = Field(alias="dlq.source.partition",
                                      description="its partition (decimal)")
    source_offset: DecimalText = Field(alias="dlq.source.offset", description="its offset (decimal)")
    error: HeaderText | None = Field(None, alias="dlq.error", description=(
        "internal_error: the exception's class; output_rejected: the broker's error (at most 1000"
        " characters); absent otherwise"))
    headers_dropped: DecimalText | None = Field(None, alias="dlq.headers.dropped", description=(
        "how many of the original message's headers were not copied (over 16 KiB); absent when"
        " all were"))
    truncated: Literal["true"] | None = Field(None, alias="dlq.truncated", description=(
        "the original did not fit under SEG_MAX_RECORD_BYTES: the key (at most 1 KiB) and value"
        " are prefixes, the dlq.original.* headers give the sizes and hashes of the whole;"
        " absent otherwise"))
    original_key_bytes: DecimalText | None = Field(None, alias="dlq.original.key.bytes", description=(
        "the original key's size in bytes (with dlq.truncated, or when the dead letter is"
        " stripped of key and value); absent when the message had no key"))
    original_key_sha256: str | None = Field(
        None, alias="dlq.original.key.sha256", pattern=SHA256_PATTERN,
        description="the original key's SHA-256 (hex), with dlq.original.key.bytes")
    original_value_bytes: DecimalText | None = Field(None, alias="dlq.original.value.bytes", description=(
        "the original value's size in bytes (with dlq.truncated, or when the dead letter is"
        " stripped of key and value); absent when the message had no value"))
    original_value_sha256: str | None = Field(
        None, alias="dlq.original.value.sha256", pattern=SHA256_PATTERN,
        description="the original value's SHA-256 (hex), with dlq.original.value.bytes")

    @classmethod
    def of(cls, headers: Sequence[tuple[str, str | bytes | None]], strict: bool = True) -> DeadLetterHeaders:
        """The service's headers of a dead letter, from its Kafka headers: the last of each
        `dlq.*` name (copied original headers come first), decoded as UTF-8."""
        own: dict[str, str | None] = {}
        for name, value in headers:
            if name.startswith("dlq."):
                own[name] = value.decode("utf-8") if isinstance(value, bytes) else value
        return cls.model_validate(own, strict=strict)


class CurrentRecord(BaseModel):
    """Key `current` on `segment-models`: the version consumers must score with. It only moves
    forward (a rollback republishes an old model as a new version)."""

    model_config = _RECORD
    version: Version = Field(description="a version published under the key v<version>")


class PinnedRecord(BaseModel):
    """Key `pinned` on `segment-models`: a rollback pins the current model (scheduled retrains
    wait); `trainer unpin` writes `{"version": null}`."""

    model_config = _RECORD
    version: Version | None = Field(description="the pinned version; null: not pinned")


class ReservedRecord(BaseModel):
    """Key `reserved` on `segment-models`: the trainer's counters when the challenger slot last
    changed, so that a discarded challenger's version and segment ids are never handed out again
    once compaction has removed its record."""

    model_config = _RECORD
    version: int = Field(ge=0, description="the highest version handed out (0: none)")
    next_segment_id: int = Field(ge=0, le=SEGMENT_ID_LIMIT,
                                 description="the next fresh segment id the trainer will hand out")


# The models topic's records by key (`segmentation.model_log`): `v<N>` and `challenger` hold a
# bundle (`challenger`: a tombstone once promoted or discarded; `v<N>`: one once it lost a
# publish race).
MODELS_TOPIC_RECORDS: dict[str, type[BaseModel]] = {
    "v<N>": ModelBundle,
    CURRENT: CurrentRecord,
    PINNED: PinnedRecord,
    CHALLENGER: ModelBundle,
    RESERVED: ReservedRecord,
}

_BUNDLE_DESCRIPTION = (
    "A model bundle: the value of the keys v<N> (the bundle of version N, written once) and"
    " challenger (scored in the shadow of the current model) on segment-models. Everything a"
    " consumer needs to score, as validated JSON."
)

# File name (in `SCHEMA_DIR`, `<name>.schema.json`) -> the model it is generated from.
SCHEMAS: dict[str, type[BaseModel]] = {
    "assignment": AssignmentRecord,
    "segment-change": SegmentChange,
    "dead-letter-headers": DeadLetterHeaders,
    "models-current": CurrentRecord,
    "models-pinned": PinnedRecord,
    "models-reserved": ReservedRecord,
    "model-bundle": ModelBundle,
}


def json_schema(name: str) -> dict[str, Any]:
    """The JSON Schema committed as `schemas/<name>.schema.json`."""
    model = SCHEMAS[name]
    schema = model.model_json_schema(by_alias=True)
    schema["$schema"] = DRAFT
    schema["title"] = model.__name__
    described = _BUNDLE_DESCRIPTION if model is ModelBundle else schema["description"]
    schema["description"] = " ".join(described.split())
    return schema


def schema_text(name: str) -> str:
    """`json_schema(name)` as the committed file holds it."""
    return json.dumps(json_schema(name), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_schemas(directory: Path = SCHEMA_DIR) -> list[Path]:
    """Write every schema to `directory` (created if missing); returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name in SCHEMAS:
        path = directory / f"{name}.schema.json"
        path.write_text(schema_text(name), encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":  # python -m segmentation.contracts [DIR]: writes segmentation/schemas/*.json
    for written in write_schemas(Path(sys.argv[1]) if len(sys.argv) > 1 else SCHEMA_DIR):
        print(written)
