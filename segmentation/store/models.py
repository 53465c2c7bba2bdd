"""The model registry's Redis cache: immutable bundles, one atomically switched pointer, the
version and segment-id counters, and the challenger slot (a candidate bundle consumers score in
the shadow of the current one).

It caches the compacted models topic (``segmentation.model_log``), which is the record of
truth: ``restore`` rebuilds it from the topic after Redis was lost or fell behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import redis

from segmentation.bundle import BundleError, ModelBundle
from segmentation.readback import Readback, ReadbackError, check_bundle_size, decode_number, redis_record
from segmentation.store.keys import Keys

log = logging.getLogger(__name__)

# What the models channel carries when the challenger slot changed (a version number otherwise).
CHALLENGER_NOTICE = "challenger"

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

# Rebuild the registry part of the cache from the models topic. Counters only ever rise, the
# pointer only ever moves forward (a consumer never goes back to an older version), and the pin
# mirrors the topic. KEYS: version_seq, segment_id_seq, current, pinned, registry_offset.
# ARGV: highest version, next segment id, current ('' if none), pinned ('' if none), the
# topic's end offset, the notification channel.
# A value that is not a number as Python reads it (decimal digits, no leading zero) is garbage:
# it is replaced.
_RESTORE = """
local function number(key)
  local v = redis.call('GET', key)
  if v and string.len(v) <= 16 and (v == '0' or string.match(v, '^[1-9]%d*$')) then
    return tonumber(v)
  end
  return nil
end
local function raise_to(key, value)
  local cur = number(key) or -1
  if cur < value then redis.call('SET', key, value) end
end
raise_to(KEYS[1], tonumber(ARGV[1]))
raise_to(KEYS[2], tonumber(ARGV[2]))
local switched = 0
if ARGV[3] ~= '' then
  local cur = number(KEYS[3])
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


class PublishConflict(RuntimeError):
    """Another trainer published on the same base version first."""


@dataclass(frozen=True)
class Counters:
    """How far the version and segment-id counters have gone: every version up to ``version``
    and every id below ``next_segment_id`` was handed out once and is never handed out again."""

    version: int
    next_segment_id: int


@dataclass(frozen=True)
class StoredBundle:
    """A bundle value as Redis holds it, before it is parsed: its key, its size, and its bytes
    when within the cap (None: larger than ``SEG_MAX_BUNDLE_BYTES``, so never fetched)."""

    key: str
    size: int
    raw: bytes | None

    @property
    def fingerprint(self) -> str:
        """What tells this value from another under the same key, cheaply: its size and a hash
        of its bytes (the size alone for one over the cap).

        >>> StoredBundle("k", 3, b"abc").fingerprint == StoredBundle("k", 3, b"abd").fingerprint
        False
        >>> StoredBundle("k", 5 << 20, None).fingerprint
        '5242880:too_large'
        """
        if self.raw is None:
            return f"{self.size}:too_large"
        return f"{self.size}:{hashlib.blake2b(self.raw, digest_size=32).hexdigest()}"


class ModelStore:
    """Model versions in Redis. Every read is validated; every publish is compare-and-set.
    ``readback`` counts and reports what is refused on reading (its trainer state and replica
    states too)."""

    def __init__(self, client: redis.Redis, prefix: str, readback: Readback | None = None) -> None:
        self.client = client
        self.keys = Keys(prefix)
        self.readback = readback or Readback()
        self._publish = client.register_script(_PUBLISH)
        self._restore = client.register_script(_RESTORE)

    def _get(self, key: str) -> bytes | None:
        """GET a model key; a key of another type is an invalid model, not a crash."""
        try:
            return self.client.get(key)  # type: ignore[return-value]
        except redis.ResponseError as exc:
            raise BundleError(f"{key}: {exc}") from None

    def _number(self, key: str, raw: bytes | str | None, low: int = 0) -> int | None:
        """A pointer or counter read from ``key`` (None: absent); ``ReadbackError`` (reported)
        if it is not a number."""
        if raw is None:
            return None
        try:
            return decode_number(raw, low)
        except ReadbackError as exc:
            self.readback.rejected("redis_pointer", redis_record(key, raw), exc)
            raise

    def current_version(self) -> int | None:
        """The current version (None: none yet); ``BundleError`` if the pointer is not a version."""
        try:
            return self._number(self.keys.current, self._get(self.keys.current), low=1)
        except ReadbackError as exc:
            raise BundleError(f"current pointer is not a version number ({exc.reason})") from None

    def stored(self, key: str) -> StoredBundle | None:
        """The bundle value under ``key`` (None: absent), fetched only when ``STRLEN`` says it is
        within the cap, so an oversize value never crosses the network or meets a parser; a key
        of another type is ``BundleError``."""
        cap = self.readback.max_bundle_bytes
        try:
            size = int(self.client.strlen(key))
        except redis.ResponseError as exc:
            raise BundleError(f"{key}: {exc}") from None
        if size > cap:
            return StoredBundle(key, size, None)
        raw = self._get(key)
        if raw is None:
            return None
        return StoredBundle(key, len(raw), raw if len(raw) <= cap else None)  # grown since STRLEN

    def decode(self, stored: StoredBundle) -> ModelBundle:
        """``stored`` parsed and validated; ``BundleError`` if it is not a bundle within the cap
        (counted and logged once as ``redis_bundle``)."""
        try:
            check_bundle_size(stored.size, self.readback.max_bundle_bytes)  # raw is None only over it
            return self.readback.bundle(stored.raw or b"")
        except ReadbackError as exc:
            name = f"{stored.key[:100]!r}#{stored.fingerprint[:24]}"
            self.readback.rejected("redis_bundle", name, exc)
            raise BundleError(f"{stored.key}: {exc}") from None

    def load(self, version: int) -> ModelBundle:
        """The bundle of ``version``, validated; ``BundleError`` if missing, over the cap or invalid."""
        stored = self.stored(self.keys.bundle(version))
        if stored is None:
            raise BundleError(f"bundle v{version} does not exist")
        bundle = self.decode(stored)
        if bundle.version != version:
            raise BundleError(f"bundle stored as v{version} says it is v{bundle.version}")
        return bundle

    def load_current(self) -> ModelBundle | None:
        version = self.current_version()
        return None if version is None else self.load(version)

    def challenger(self) -> ModelBundle | None:
        """The challenger bundle, validated, or None when the slot is empty; ``BundleError`` if
        what the slot holds is not a valid bundle (or a key of another type)."""
        stored = self.stored(self.keys.challenger)
        return None if stored is None else self.decode(stored)

    def set_challenger(self, bundle: ModelBundle | None) -> None:
        """Store ``bundle`` as the challenger (replacing any), or empty the slot (None), and tell
        the consumers on the models channel, in one transaction."""
        pipe = self.client.pipeline(transaction=True)
        if bundle is None:
            pipe.delete(self.keys.challenger)
        else:
            pipe.set(self.keys.challenger, bundle.to_json())
        pipe.publish(self.keys.models_channel, CHALLENGER_NOTICE)
        pipe.execute()

    def versions(self) -> list[int]:
        """The published versions; a member that is not a version number is skipped (reported)."""
        members: list[bytes] = self.client.zrange(self.keys.versions, 0, -1)  # type: ignore[assignment]
        versions: list[int | None] = []
        for member in members:
            with contextlib.suppress(ReadbackError):
                versions.append(self._number(self.keys.versions, member, low=1))
        return [v for v in versions if v is not None]

    def allocate_version(self) -> int:
        return int(self.client.incr(self.keys.version_seq))

    def allocate_segment_ids(self, n: int) -> list[int]:
        """``n`` fresh segment ids, never handed out before (ids start at 0)."""
        end = int(self.client.incrby(self.keys.segment_id_seq, n))
        return list(range(end - n, end))

    def counters(self) -> Counters:
        """The version and segment-id counters as they stand (0 for a counter never used);
        ``BundleError`` if one is not a number (``restore`` rewrites it from the models topic)."""
        keys = [self.keys.version_seq, self.keys.segment_id_seq]
        try:
            version, next_id = (self._number(k, raw) or 0 for k, raw in zip(keys, self.client.mget(keys),
                                                                             strict=True))
        except ReadbackError as exc:
            raise BundleError(f"a version or segment-id counter is not a number ({exc.reason})") from None
        return Counters(version, next_id)

    def pointers_readable(self) -> bool:
        """Whether the current pointer and the counters are numbers or absent (reported if not)."""
        lows = {self.keys.current: 1, self.keys.version_seq: 0, self.keys.segment_id_seq: 0}
        readable = True
        for (key, low), raw in zip(lows.items(), self.client.mget(list(lows)), strict=True):
            try:
                self._number(key, raw, low)
            except ReadbackError:
                readable = False
        return readable

    def publish(self, bundle: ModelBundle, base_version: int | None) -> None:
        """Store ``bundle`` and make it current, only if current is still ``base_version``.

        Bundle write, pointer switch, history and notification happen in one Lua script, so a
        crash of the trainer at any point leaves either the old or the new model current.
        """
        result = self._publish(
            keys=[self.keys.current, self.keys.bundle(bundle.version), self.keys.versions],
            args=["" if base_version is None else str(base_version), str(bundle.version),
                  bundle.to_json(), self.keys.models_channel],
        )
        if result == 0:
            raise PublishConflict(f"current moved away from base v{base_version}")
        if result == -1:
            raise PublishConflict(f"v{bundle.version} is not newer than current")
        if result == -2:
            raise PublishConflict(f"v{bundle.version} already exists")

    def registry_offset(self) -> int | None:
        """The models topic's end offset this cache last caught up with (None: never, lost, or
        garbage: catch up from the topic again)."""
        try:
            return self._number(self.keys.registry_offset, self._get(self.keys.registry_offset))
        except (ReadbackError, BundleError):
            return None

    def set_registry_offset(self, offset: int) -> None:
        self.client.set(self.keys.registry_offset, offset)

    def restore(self, bundles: Sequence[ModelBundle], max_version: int, next_segment_id: int,
                current: int | None, pinned: int | None, end_offset: int, *,
                challenger: ModelBundle | None) -> bool:
        """Bring the cache up to the models topic: missing bundles written, counters raised,
        the pointer moved forward (never back) and announced, the pin and the challenger
        mirrored. Idempotent; returns True if the pointer moved."""
        self._mirror_challenger(challenger, max_version)
        pipe = self.client.pipeline(transaction=False)
        for bundle in bundles:
            pipe.set(self.keys.bundle(bundle.version), bundle.to_json(), nx=True)
            pipe.zadd(self.keys.versions, {str(bundle.version): bundle.version})
        pipe.execute()
        keys = [self.keys.version_seq, self.keys.segment_id_seq, self.keys.current,
                self.keys.pinned, self.keys.registry_offset]
        args = [max_version, next_segment_id, "" if current is None else current,
                "" if pinned is None else pinned, end_offset, self.keys.models_channel]
        return bool(self._restore(keys=keys, args=args))

    def _mirror_challenger(self, challenger: ModelBundle | None, max_version: int) -> None:
        """Make the challenger slot hold ``challenger`` (the topic's, read up to ``max_version``),
        announcing it only if it changed. A challenger newer than that read was set after it and
        is left alone; one that is not a valid bundle is replaced."""
        try:
            held = self.challenger()
        except BundleError as exc:
            log.error("challenger slot invalid; replaced from the models topic", extra={"error": str(exc)})
            held = None
            self.client.delete(self.keys.challenger)
        held_version = None if held is None else held.version
        if held_version is not None and held_version > max_version:
            return
        if held_version != (None if challenger is None else challenger.version):
            self.set_challenger(challenger)
