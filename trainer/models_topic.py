"""The models topic as the trainer uses it: segmentation's ``ModelLog`` (writes) and
``sync_store`` (the Redis cache brought into agreement with the topic), bound to the Kafka
connection by the composition root."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from segmentation.model_log import ModelLog
from segmentation.store import ModelStore


@dataclass(frozen=True)
class ModelTopic:
    """``log()`` opens a writer of the models topic; ``sync(store)`` catches the Redis cache up
    with the topic (True if anything was written)."""

    log: Callable[[], ModelLog]
    sync: Callable[[ModelStore], bool]
