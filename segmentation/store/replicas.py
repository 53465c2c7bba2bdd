"""Each consumer replica's online centroids and quality figures, for the trainer (drift-early
retraining) and for operators. Short-lived (TTL): a replica that stops disappears."""

from __future__ import annotations

import json
from typing import Any

import redis

from segmentation.readback import Readback, ReadbackError, decode_replica_state, redis_record
from segmentation.store.client import ErrorCounter, best_effort
from segmentation.store.keys import Keys
from segmentation.store.models import ModelStore


class ReplicaStates:
    def __init__(self, client: redis.Redis, keys: Keys, errors: ErrorCounter | None = None,
                 readback: Readback | None = None) -> None:
        self.client = client
        self.keys = keys
        self.errors = errors
        self.readback = readback or Readback()

    @classmethod
    def of(cls, store: ModelStore, errors: ErrorCounter | None = None) -> ReplicaStates:
        return cls(store.client, store.keys, errors, store.readback)

    def put(self, replica: str, state: dict[str, Any], ttl_s: int) -> None:
        self.client.set(self.keys.online(replica), json.dumps(state), ex=ttl_s)

    def all(self) -> list[dict[str, Any]]:
        """Every live replica's state; values that are not replica states
        (``readback.decode_replica_state``) are skipped and reported, and states that cannot be
        read (an outage, a key of another type) count as none."""
        def read() -> list[tuple[bytes, bytes | None]]:
            keys: list[bytes] = list(self.client.scan_iter(match=self.keys.online("*"), count=100))
            values: list[bytes | None] = self.client.mget(keys) if keys else []  # type: ignore[assignment]
            return list(zip(keys, values, strict=True))

        latest = self.readback.latest_ms()
        states = []
        read_back: list[tuple[bytes, bytes | None]] = best_effort("replica_state", read, [], self.errors)
        for key, raw in read_back:
            if raw is None:  # expired between the scan and the read
                continue
            try:
                states.append(decode_replica_state(raw, latest))
            except ReadbackError as exc:
                self.readback.rejected("replica_state", redis_record(key, raw), exc)
        return states
