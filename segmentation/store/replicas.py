"""Each consumer replica's online centroids and quality figures, for the trainer (drift-early
retraining) and for operators. Short-lived (TTL): a replica that stops disappears."""

from __future__ import annotations

import json
from typing import Any

import redis

from segmentation.store.client import ErrorCounter, best_effort, json_objects
from segmentation.store.keys import Keys
from segmentation.store.models import ModelStore


class ReplicaStates:
    def __init__(self, client: redis.Redis, keys: Keys, errors: ErrorCounter | None = None) -> None:
        self.client = client
        self.keys = keys
        self.errors = errors

    @classmethod
    def of(cls, store: ModelStore, errors: ErrorCounter | None = None) -> ReplicaStates:
        return cls(store.client, store.keys, errors)

    def put(self, replica: str, state: dict[str, Any], ttl_s: int) -> None:
        self.client.set(self.keys.online(replica), json.dumps(state), ex=ttl_s)

    def all(self) -> list[dict[str, Any]]:
        """Every live replica's state; values that are not JSON objects are skipped, and states
        that cannot be read (an outage, a key of another type) count as none."""
        def read() -> list[Any]:
            keys = list(self.client.scan_iter(match=self.keys.online("*"), count=100))
            return self.client.mget(keys) if keys else []

        return json_objects(best_effort("replica_state", read, [], self.errors))
