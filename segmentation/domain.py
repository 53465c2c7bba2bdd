"""The project's closed vocabularies: the values that records, metric labels and logs share
(typed: a typo is a mypy error, not a silently new label value). Pure: no I/O.

The metrics export every value known up front at 0 (``segmentation.metrics``), so each tuple here
is also a list of label values.
"""

from __future__ import annotations

from typing import Literal, get_args

RedisOperation = Literal[
    "model_poll", "model_load", "pubsub", "customer_write", "replica_state", "lease", "pinned", "run_log",
]
REDIS_OPERATIONS: tuple[RedisOperation, ...] = (
    "model_poll", "model_load", "pubsub", "customer_write", "replica_state",
)
# The trainer's best-effort Redis calls (segmentation.store.trainer_state, .replicas).
TRAINER_REDIS_OPERATIONS: tuple[RedisOperation, ...] = ("lease", "pinned", "run_log", "replica_state")
# How a trainer run ended, and the quality gate's checks: typed vocabularies (a typo is a mypy
# error, not a silently new label value).
RunOutcome = Literal["published", "challenger", "rejected", "no_structure", "failed", "skipped"]
# What happened to a challenger (a candidate scored in the shadow before it may go live).
ChallengerAction = Literal["published", "promoted", "discarded", "stale"]
GateCheck = Literal[
    "finite", "min_share", "separation", "spread_separation", "min_silhouette",
    "max_davies_bouldin", "silhouette", "silhouette_drop", "davies_bouldin_rise", "structure",
]
RUN_RESULTS: tuple[RunOutcome, ...] = get_args(RunOutcome)
GATE_CHECKS: tuple[GateCheck, ...] = get_args(GateCheck)
CHALLENGER_ACTIONS: tuple[ChallengerAction, ...] = get_args(ChallengerAction)
LABEL_CHANGE_KINDS = ("matched", "new", "retired")
# Why a customer's segment changed (consumer.changes).
ChangeCause = Literal["initial", "behaviour", "model", "unknown"]
CHANGE_CAUSES: tuple[ChangeCause, ...] = get_args(ChangeCause)
# Records the service reads back from its own topics and Redis keys, refused (segmentation.readback):
# where they were read, and why.
ReadbackSource = Literal[
    "models_topic", "changes_topic", "redis_pointer", "redis_bundle", "replica_state", "run_log",
]
ReadbackReason = Literal["too_large", "too_deep", "not_json", "wrong_type", "bad_key", "bad_time"]
READBACK_SOURCES: tuple[ReadbackSource, ...] = get_args(ReadbackSource)
READBACK_REASONS: tuple[ReadbackReason, ...] = get_args(ReadbackReason)
