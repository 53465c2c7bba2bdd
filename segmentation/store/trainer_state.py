"""The trainer's own state in Redis: the lease that lets one trainer run at a time, the pin a
rollback sets, and the bounded log of recent runs.

None of it may stop a run or the periodic trainer: a key of the wrong type, an OOM reply from a
full Redis or an outage is logged and counted (``best_effort``), and the safe answer is taken
(no lease: skip the run; an unreadable pin: hold retrains; an unreadable run log: empty).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import redis

from segmentation.readback import Readback, ReadbackError, decode_number, decode_run, redis_record
from segmentation.store.client import ErrorCounter, best_effort
from segmentation.store.keys import Keys
from segmentation.store.models import ModelStore

log = logging.getLogger(__name__)

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

# A pin that cannot be read (not a number, a key of another type) still holds retrains.
UNREADABLE_PIN = 0


class TrainerState:
    def __init__(self, client: redis.Redis, keys: Keys, errors: ErrorCounter | None = None,
                 readback: Readback | None = None) -> None:
        self.client = client
        self.keys = keys
        self.errors = errors
        self.readback = readback or Readback()
        self._release = client.register_script(_RELEASE)
        self._renew = client.register_script(_RENEW)

    @classmethod
    def of(cls, store: ModelStore, errors: ErrorCounter | None = None) -> TrainerState:
        """The trainer state next to ``store``'s models (same Redis, same prefix, same
        reporting of what is refused on reading)."""
        return cls(store.client, store.keys, errors, store.readback)

    @contextlib.contextmanager
    def lease(self, ttl_s: int) -> Iterator[bool]:
        """Yields True when this caller holds the trainer lock, False when another does or Redis
        cannot give it (down, full).

        While held, a background thread renews the lease every third of its TTL, so a run
        longer than the TTL keeps it; a crashed holder stops renewing and the lease expires."""
        token = uuid.uuid4().hex
        key = self.keys.lock
        held = best_effort("lease", lambda: bool(self.client.set(key, token, nx=True, px=ttl_s * 1000)),
                           False, self.errors)
        done = threading.Event()

        def renew() -> None:
            while not done.wait(ttl_s / 3):
                best_effort("lease", lambda: self._renew(keys=[key], args=[token, ttl_s * 1000]),
                            None, self.errors)

        renewer = threading.Thread(target=renew, name="lease-renewal", daemon=True)
        if held:
            renewer.start()
        try:
            yield held
        finally:
            done.set()
            if held:
                renewer.join()
                best_effort("lease", lambda: self._release(keys=[key], args=[token]), None, self.errors)

    def pin(self, version: int) -> None:
        """Hold scheduled retrains (set by `trainer rollback`, cleared by `trainer unpin`)."""
        self.client.set(self.keys.pinned, version)

    def unpin(self) -> bool:
        return bool(self.client.delete(self.keys.pinned))

    def pinned(self) -> int | None:
        """The version a rollback pinned, or None. A value that is not a version number, or a key
        of another type, still holds retrains (``UNREADABLE_PIN``): an operator meant to pin;
        `trainer unpin` clears it. An outage raises (the caller decides)."""
        try:
            raw = self.client.get(self.keys.pinned)
        except redis.ResponseError as exc:
            log.error("pinned key unreadable; retrains stay held", extra={"error": str(exc)})
            if self.errors is not None:
                self.errors.labels("pinned").inc()
            return UNREADABLE_PIN
        if raw is None:
            return None
        try:
            return decode_number(raw, low=1)
        except ReadbackError as exc:  # reported once; retrains stay held
            self.readback.rejected("redis_pointer", redis_record(self.keys.pinned, raw), exc)
            return UNREADABLE_PIN

    def record_run(self, run: dict[str, Any], keep: int = 200) -> None:
        """Append a trainer run (published, rejected with why, ...) to a bounded log."""
        def append() -> None:
            pipe = self.client.pipeline()
            pipe.lpush(self.keys.runs, json.dumps(run, default=str))
            pipe.ltrim(self.keys.runs, 0, keep - 1)
            pipe.execute()

        best_effort("run_log", append, None, self.errors)

    def runs(self, count: int = 50) -> list[dict[str, Any]]:
        """Recent runs, newest first; entries that are not run entries (``readback.decode_run``)
        are skipped and reported, and a log that cannot be read is empty."""
        def read() -> list[bytes]:
            return self.client.lrange(self.keys.runs, 0, count - 1)  # type: ignore[return-value]

        latest = self.readback.latest_ms()
        runs = []
        raws: list[bytes] = best_effort("run_log", read, [], self.errors)
        for raw in raws:
            try:
                runs.append(decode_run(raw, latest))
            except ReadbackError as exc:
                self.readback.rejected("run_log", redis_record(self.keys.runs, raw), exc)
        return runs
