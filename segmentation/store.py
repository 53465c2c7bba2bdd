"""Redis: the model store (immutable versions + one atomically switched pointer), the trainer's
lease lock, and per-customer latest assignments written idempotently.

The model keys are a cache of the compacted models topic (``segmentation.model_log``), which is
the record of truth: ``restore`` rebuilds them from it after Redis was lost or fell behind.

Keys (``P`` is ``settings.redis_prefix``)::

    P:bundle:<v>        JSON bundle, written once (SET NX), never changed
    P:current           the current version number (switched only by the publish script)
    P:versions          sorted set of published versions
    P:version_seq       INCR counter: versions strictly rise, even across rollbacks
    P:segment_id_seq    INCR counter: segment ids are never reused
    P:lock              trainer lease (SET NX PX, released only by its owner)
    P:pinned            set by a rollback: scheduled retrains wait until `trainer unpin`
    P:registry_offset   the models topic's end offset this cache last caught up with
    P:customer:<id>     hash: latest segment of a customer
    P:online:<replica>  JSON: a consumer replica's online centroids and quality figures
    P:models            pub/sub channel: a published version number
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from segmentation.bundle import BundleError, ModelBundle
from segmentation.settings import Settings

log = logging.getLogger(__name__)

REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError)

# Compare-and-set publish: all or nothing, because a Lua script runs atomically in Redis.
_PUBLISH = """
local cur = redis.call('GET', KEYS[1])
if (cur or '') ~= ARGV[1] then return 0 end
if cur and tonumber(ARGV[2]) <= tonumber(cur) then return -1 end
if not redis.call('SET', KEYS[2], ARGV[3], 'NX') then return -2 end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[3], tonumber(ARGV[2]), ARGV[2])
redis.call('PUBLISH', ARGV[4], ARGV[2])
return 1
"""

# An older event (event time, then offset) never overwrites a newer assignment. One call per
# batch: ARGV[1] is a JSON array of [event_ms, offset, segment_id, segment, version, event_id],
# one per key (packing one string is far cheaper than thousands of arguments).
_WRITE_CUSTOMERS = """
local rows = cjson.decode(ARGV[1])
local ttl = tonumber(ARGV[2])
local written = 0
for i, key in ipairs(KEYS) do
  local r = rows[i]
  -- A key of another type, or fields that are not numbers, is garbage: the assignment replaces it.
  local kind = redis.call('TYPE', key)['ok']
  if kind ~= 'hash' and kind ~= 'none' then redis.call('DEL', key) end
  local cur = redis.call('HMGET', key, 'event_ms', 'offset')
  local newer = true
  local cms = tonumber(cur[1])
  if cms then
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

# Rebuild the registry part of the cache from the models topic. Counters only ever rise, the
# pointer only ever moves forward (a consumer never goes back to an older version), and the pin
# mirrors the topic. KEYS: version_seq, segment_id_seq, current, pinned, registry_offset.
# ARGV: highest version, next segment id, current ('' if none), pinned ('' if none), the
# topic's end offset, the notification channel.
_RESTORE = """
local function raise_to(key, value)
  local cur = tonumber(redis.call('GET', key) or '') or -1
  if cur < value then redis.call('SET', key, value) end
end
raise_to(KEYS[1], tonumber(ARGV[1]))
raise_to(KEYS[2], tonumber(ARGV[2]))
local switched = 0
if ARGV[3] ~= '' then
  local cur = tonumber(redis.call('GET', KEYS[3]) or '')
  if cur == nil or cur < tonumber(ARGV[3]) then
    redis.call('SET', KEYS[3], ARGV[3])
    redis.call('PUBLISH', ARGV[6], ARGV[3])
    switched = 1
  end
end
if ARGV[4] ~= '' then redis.call('SET', KEYS[4], ARGV[4]) else redis.call('DEL', KEYS[4]) end
redis.call('SET', KEYS[5], ARGV[5])
return switched
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


def connect(settings: Settings) -> redis.Redis:
    """A client that retries connection errors with exponential backoff, a bounded number
    of times, and never blocks longer than the configured socket timeout per attempt."""
    return redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), settings.redis_retries),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        health_check_interval=10,
        **_credentials(settings),
    )


def _credentials(settings: Settings) -> dict[str, str]:
    """Username and password from their own settings (the password is a secret, never in a URL
    that could be logged); a URL's own credentials apply when these are not set."""
    credentials = {}
    if settings.redis_username is not None:
        credentials["username"] = settings.redis_username
    if settings.redis_password is not None:
        credentials["password"] = settings.redis_password.get_secret_value()
    return credentials


class RedisRefused(RuntimeError):
    """Redis answers but refuses this client (wrong password, no permission): a setting to fix."""


def check_redis(client: redis.Redis) -> None:
    """At start: a wrong password or a missing permission is a configuration error (raises
    ``RedisRefused`` with one readable line); an unreachable Redis is not (it is an outage the
    services ride out)."""
    try:
        client.ping()
    except redis.AuthenticationError as exc:
        raise RedisRefused(
            f"Redis refused the credentials (SEG_REDIS_USERNAME, SEG_REDIS_PASSWORD): {exc}"
        ) from None
    except redis.ResponseError as exc:
        if "NOPERM" in str(exc) or "NOAUTH" in str(exc):
            raise RedisRefused(f"Redis refused this client: {exc}") from None
        raise
    except redis.ConnectionError:
        log.warning("Redis unreachable at start; going on without it for now")


def connect_customers(settings: Settings) -> redis.Redis | RedisCluster:
    """The client for per-customer state: the model store's Redis, another one, or a Redis
    Cluster when one node cannot hold every customer."""
    url = settings.customer_redis_url or settings.redis_url
    if not settings.customer_redis_cluster:
        return connect(settings) if url == settings.redis_url else connect(
            settings.model_copy(update={"redis_url": url}))
    return RedisCluster.from_url(
        url,
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), settings.redis_retries),
        **_credentials(settings),
    )


class PublishConflict(RuntimeError):
    """Another trainer published on the same base version first."""


class PartialWrite(redis.RedisError):
    """Some of a batch's customer writes failed (a cluster node down); the rest are written."""

    def __init__(self, message: str, written: int, failed: int) -> None:
        super().__init__(message)
        self.written = written
        self.failed = failed


@dataclass(frozen=True, slots=True)
class CustomerAssignment:
    customer_id: str
    event_ms: int
    offset: int
    segment_id: int
    segment: str
    model_version: int
    event_id: str


class ModelStore:
    """Model versions in Redis. Every read is validated; every publish is compare-and-set."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self.channel = f"{prefix}:models"
        self._publish = client.register_script(_PUBLISH)
        self._release = client.register_script(_RELEASE)
        self._renew = client.register_script(_RENEW)
        self._restore = client.register_script(_RESTORE)

    def _key(self, *parts: object) -> str:
        return ":".join([self.prefix, *map(str, parts)])

    def _get(self, key: str) -> bytes | None:
        """GET a model key; a key of another type is an invalid model, not a crash."""
        try:
            return self.client.get(key)  # type: ignore[return-value]
        except redis.ResponseError as exc:
            raise BundleError(f"{key}: {exc}") from None

    def current_version(self) -> int | None:
        raw = self._get(self._key("current"))
        if raw is None:
            return None
        try:
            return int(raw)
        except ValueError:
            raise BundleError(f"current pointer is not a version number: {raw!r}") from None

    def load(self, version: int) -> ModelBundle:
        """The bundle of ``version``, validated; ``BundleError`` if missing or invalid."""
        raw = self._get(self._key("bundle", version))
        if raw is None:
            raise BundleError(f"bundle v{version} does not exist")
        bundle = ModelBundle.from_json(raw)
        if bundle.version != version:
            raise BundleError(f"bundle stored as v{version} says it is v{bundle.version}")
        return bundle

    def load_current(self) -> ModelBundle | None:
        version = self.current_version()
        return None if version is None else self.load(version)

    def versions(self) -> list[int]:
        members: list[bytes] = self.client.zrange(self._key("versions"), 0, -1)  # type: ignore[assignment]
        return [int(v) for v in members if v.isdigit()]

    def allocate_version(self) -> int:
        return int(self.client.incr(self._key("version_seq")))

    def allocate_segment_ids(self, n: int) -> list[int]:
        """``n`` fresh segment ids, never handed out before (ids start at 0)."""
        end = int(self.client.incrby(self._key("segment_id_seq"), n))
        return list(range(end - n, end))

    def publish(self, bundle: ModelBundle, base_version: int | None) -> None:
        """Store ``bundle`` and make it current, only if current is still ``base_version``.

        Bundle write, pointer switch, history and notification happen in one Lua script, so a
        crash of the trainer at any point leaves either the old or the new model current.
        """
        result = self._publish(
            keys=[self._key("current"), self._key("bundle", bundle.version), self._key("versions")],
            args=["" if base_version is None else str(base_version), str(bundle.version),
                  bundle.to_json(), self.channel],
        )
        if result == 0:
            raise PublishConflict(f"current moved away from base v{base_version}")
        if result == -1:
            raise PublishConflict(f"v{bundle.version} is not newer than current")
        if result == -2:
            raise PublishConflict(f"v{bundle.version} already exists")

    def registry_offset(self) -> int | None:
        """The models topic's end offset this cache last caught up with (None: never, or lost)."""
        raw = self.client.get(self._key("registry_offset"))
        try:
            return None if raw is None else int(raw)
        except ValueError:
            return None

    def set_registry_offset(self, offset: int) -> None:
        self.client.set(self._key("registry_offset"), offset)

    def restore(self, bundles: Sequence[ModelBundle], max_version: int, next_segment_id: int,
                current: int | None, pinned: int | None, end_offset: int) -> bool:
        """Bring the cache up to the models topic: missing bundles written, counters raised,
        the pointer moved forward (never back) and announced, the pin mirrored. Idempotent;
        returns True if the pointer moved."""
        pipe = self.client.pipeline(transaction=False)
        for bundle in bundles:
            pipe.set(self._key("bundle", bundle.version), bundle.to_json(), nx=True)
            pipe.zadd(self._key("versions"), {str(bundle.version): bundle.version})
        pipe.execute()
        keys = [self._key(k) for k in ("version_seq", "segment_id_seq", "current", "pinned",
                                       "registry_offset")]
        args = [max_version, next_segment_id, "" if current is None else current,
                "" if pinned is None else pinned, end_offset, self.channel]
        return bool(self._restore(keys=keys, args=args))

    @contextlib.contextmanager
    def lease(self, ttl_s: int) -> Iterator[bool]:
        """Yields True when this caller holds the trainer lock, False when another does.

        While held, a background thread renews the lease every third of its TTL, so a run
        longer than the TTL keeps it; a crashed holder stops renewing and the lease expires."""
        token = uuid.uuid4().hex
        key = self._key("lock")
        held = bool(self.client.set(key, token, nx=True, px=ttl_s * 1000))
        done = threading.Event()

        def renew() -> None:
            while not done.wait(ttl_s / 3):
                with contextlib.suppress(*REDIS_ERRORS):
                    self._renew(keys=[key], args=[token, ttl_s * 1000])

        renewer = threading.Thread(target=renew, name="lease-renewal", daemon=True)
        if held:
            renewer.start()
        try:
            yield held
        finally:
            done.set()
            if held:
                renewer.join()
                with contextlib.suppress(*REDIS_ERRORS):
                    self._release(keys=[key], args=[token])

    def pin(self, version: int) -> None:
        """Hold scheduled retrains (set by `trainer rollback`, cleared by `trainer unpin`)."""
        self.client.set(self._key("pinned"), version)

    def unpin(self) -> bool:
        return bool(self.client.delete(self._key("pinned")))

    def pinned(self) -> int | None:
        """The version a rollback pinned, or None. A value that is not a version number still
        holds retrains (0): an operator meant to pin; `trainer unpin` clears it."""
        raw = self.client.get(self._key("pinned"))
        if raw is None:
            return None
        try:
            return int(raw)
        except ValueError:
            log.error("pinned key is not a version number; retrains stay held", extra={"value": raw})
            return 0

    def record_run(self, run: dict[str, Any], keep: int = 200) -> None:
        """Append a trainer run (published, rejected with why, ...) to a bounded log."""
        with contextlib.suppress(*REDIS_ERRORS):
            key = self._key("runs")
            pipe = self.client.pipeline()
            pipe.lpush(key, json.dumps(run, default=str))
            pipe.ltrim(key, 0, keep - 1)
            pipe.execute()

    def runs(self, count: int = 50) -> list[dict[str, Any]]:
        """Recent runs, newest first; entries that are not JSON objects are skipped."""
        raws: list[bytes] = self.client.lrange(self._key("runs"), 0, count - 1)  # type: ignore[assignment]
        return _json_objects(raws)

    def put_replica_state(self, replica: str, state: dict[str, Any], ttl_s: int) -> None:
        self.client.set(self._key("online", replica), json.dumps(state), ex=ttl_s)

    def replica_states(self) -> list[dict[str, Any]]:
        keys = list(self.client.scan_iter(match=self._key("online", "*"), count=100))
        return _json_objects(self.client.mget(keys) if keys else [])


class CustomerStore:
    """Latest segment per customer. Writes are idempotent under replay, and work on a single
    Redis (one script call per batch) or a Redis Cluster (per node, one pipeline of script
    calls, one per hash slot: a script may only touch keys of one slot)."""

    def __init__(self, client: redis.Redis | RedisCluster, prefix: str, ttl_s: int = 0) -> None:
        self.client = client
        self.prefix = prefix
        self.ttl_s = ttl_s
        self._write = client.register_script(_WRITE_CUSTOMERS)

    @classmethod
    def for_settings(cls, settings: Settings) -> CustomerStore:
        return cls(connect_customers(settings), settings.redis_prefix, settings.customer_ttl_s)

    def key(self, customer_id: str) -> str:
        return f"{self.prefix}:customer:{customer_id}"

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
        if not isinstance(self.client, RedisCluster):
            return int(self._write(keys=list(rows), args=[json.dumps(list(rows.values())), self.ttl_s]))
        return self._write_cluster(rows)

    def _write_cluster(self, rows: dict[str, list[Any]]) -> int:
        """One round trip per node. A node that fails (down, failing over) costs only its own
        customers' writes, which raise after the others are written."""
        cluster = self.client
        assert isinstance(cluster, RedisCluster)
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
                    self._write(keys=keys, args=[json.dumps([rows[k] for k in keys]), self.ttl_s],
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


def _json_objects(raws: Sequence[bytes | str | None]) -> list[dict[str, Any]]:
    """The values that are JSON objects; anything else in Redis is untrusted and skipped.

    >>> _json_objects([b'{"a": 1}', None, b'[1]', b'{oops'])
    [{'a': 1}]
    """
    objects = []
    for raw in raws:
        if raw is None:
            continue
        with contextlib.suppress(ValueError):
            value = json.loads(raw)
            if isinstance(value, dict):
                objects.append(value)
    return objects


def wait_for_redis(client: redis.Redis, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.ping()
            return
        except REDIS_ERRORS:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
