"""Latest segment per customer, written idempotently, on one Redis or a Redis Cluster."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any, Protocol, cast

import msgspec
import redis
from redis.cluster import RedisCluster

from segmentation.customer import CustomerAssignment
from segmentation.store.client import RedisSettings, connect_customers
from segmentation.store.keys import Keys

# An older event (event time, then offset) never overwrites a newer assignment. One call per
# batch: ARGV[1] is a JSON array of [event_ms, offset, segment_id, segment, version, event_id],
# one per key (packing one string is far cheaper than thousands of arguments).
_WRITE_CUSTOMERS = """
local rows = cjson.decode(ARGV[1])
local ttl = tonumber(ARGV[2])
local ceiling = tonumber(ARGV[3])
local written = 0
for i, key in ipairs(KEYS) do
  local r = rows[i]
  -- A key of another type, or fields that are not numbers or lie past the ceiling (no event
  -- the consumer scores is dated that late), is garbage: the assignment replaces it.
  -- (HMGET in pcall: one call per key where TYPE first made two; a wrong type is its error)
  local ok, cur = pcall(redis.call, 'HMGET', key, 'event_ms', 'offset')
  if not ok then
    redis.call('DEL', key)
    cur = {false, false}
  end
  local newer = true
  local cms = tonumber(cur[1])
  if cms and cms <= ceiling then
    if cms > r[1] or (cms == r[1] and (tonumber(cur[2]) or -1) >= r[2]) then newer = false end
  end
  if newer then
    redis.call('HSET', key, 'event_ms', string.format('%d', r[1]), 'offset', string.format('%d', r[2]),
               'segment_id', r[3], 'segment', r[4], 'model_version', r[5], 'event_id', r[6])
    if ttl > 0 then redis.call('EXPIRE', key, ttl) end
    written = written + 1
  end
end
return written
"""


def packed(rows: list[list[Any]]) -> bytes | str:
    """The rows as the script's JSON argument: msgspec's encoder (a tenth of ``json.dumps``'s
    time, and the writer thread holds the GIL the consume loop needs), or ``json.dumps`` for a
    string msgspec cannot encode as UTF-8 (a lone surrogate, escaped as ``\\ud800``).

    >>> packed([[1, 2, 3, "s", 1, "e"]]), packed([[chr(0xD800)]])
    (b'[[1,2,3,"s",1,"e"]]', '[["\\\\ud800"]]')
    """
    try:
        return msgspec.json.encode(rows)
    except UnicodeEncodeError:
        return json.dumps(rows)


class PartialWrite(redis.RedisError):
    """Some of a batch's customer writes failed (a cluster node down); the rest are written."""

    def __init__(self, message: str, written: int, failed: int) -> None:
        super().__init__(message)
        self.written = written
        self.failed = failed


class CustomerStoreSettings(RedisSettings, Protocol):
    """What the customer store reads (``Settings`` provides it)."""

    @property
    def redis_prefix(self) -> str: ...
    @property
    def customer_ttl_s(self) -> int: ...
    @property
    def max_event_skew_s(self) -> float: ...


class CustomerStore:
    """Latest segment per customer. Writes are idempotent under replay, and work on a single
    Redis (one script call per batch) or a Redis Cluster (per node, one pipeline of script
    calls, one per hash slot: a script may only touch keys of one slot)."""

    def __init__(self, client: redis.Redis | RedisCluster, prefix: str, ttl_s: int = 0,
                 max_skew_s: float = 3600.0) -> None:
        self.client = client
        self.keys = Keys(prefix)
        self.ttl_s = ttl_s
        self.max_skew_s = max_skew_s  # how far past now a stored event time may be (else garbage)
        self._write = client.register_script(_WRITE_CUSTOMERS)

    @classmethod
    def for_settings(cls, settings: CustomerStoreSettings) -> CustomerStore:
        return cls(connect_customers(settings), settings.redis_prefix, settings.customer_ttl_s,
                   settings.max_event_skew_s)

    def key(self, customer_id: str) -> str:
        return self.keys.customer(customer_id)

    def write_latest(self, assignments: Sequence[CustomerAssignment]) -> int:
        """Write a batch in one round trip; returns how many were newer than what was stored."""
        latest: dict[str, CustomerAssignment] = {}
        for a in assignments:
            kept = latest.get(a.customer_id)
            if kept is None or (a.event_ms, a.offset) > (kept.event_ms, kept.offset):
                latest[a.customer_id] = a
        if not latest:
            return 0
        rows = {self.key(c): [a.event_ms, a.offset, a.segment_id, a.segment, a.model_version, a.event_id]
                for c, a in latest.items()}
        ceiling = self._ceiling_ms()
        if not isinstance(self.client, RedisCluster):
            return int(self._write(keys=list(rows), args=[packed(list(rows.values())), self.ttl_s, ceiling]))
        return self._write_cluster(rows, ceiling)

    def _ceiling_ms(self) -> int:
        """The latest event time a stored row may hold: the consumer scores no event dated
        past now + ``SEG_MAX_EVENT_SKEW_S``, so a later one in Redis was written by someone else."""
        return int((time.time() + self.max_skew_s) * 1000)

    def _write_cluster(self, rows: dict[str, list[Any]], ceiling: int) -> int:
        """One round trip per node. A node that fails (down, failing over) costs only its own
        customers' writes, which raise after the others are written."""
        cluster = cast(RedisCluster, self.client)
        by_node: dict[str, dict[int, list[str]]] = {}
        for key in rows:
            slot = cluster.keyslot(key)
            node = cluster.nodes_manager.get_node_from_slot(slot)
            by_node.setdefault(node.name, {}).setdefault(slot, []).append(key)
        written, failed = 0, 0
        first_error: redis.RedisError | None = None
        for name, slots in by_node.items():
            node = cluster.get_node(node_name=name)
            try:
                pipe = node.redis_connection.pipeline(transaction=False)
                for keys in slots.values():
                    self._write(keys=keys, args=[packed([rows[k] for k in keys]), self.ttl_s, ceiling],
                                client=pipe)
                written += sum(int(n) for n in pipe.execute())
            except redis.RedisError as exc:
                failed += sum(len(keys) for keys in slots.values())
                first_error = first_error or exc
                cluster.nodes_manager.initialize()  # the slot map may have moved
        if first_error is not None:
            raise PartialWrite(f"{failed} customer writes failed: {first_error}", written, failed)
        return written

    def get(self, customer_id: str) -> dict[str, str]:
        raw: dict[bytes, bytes] = self.client.hgetall(self.key(customer_id))  # type: ignore[assignment]
        return {k.decode(): v.decode() for k, v in raw.items()}
