"""A dict standing in for Redis: the reads the model store, the trainer state and the replica
states make, values as Redis returns them (bytes). For the unit tier: no Redis server."""

from __future__ import annotations

import fnmatch
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import redis


class FakeRedis:
    """The reads the store makes, on a dict; ``gets`` counts the GETs of each key (a value over
    the bundle cap must never be fetched). Pub/sub is an outage: a watcher falls back to polls."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.gets: Counter[str] = Counter()

    def register_script(self, _: str) -> Callable[..., Any]:
        def refuse(**_: Any) -> Any:
            raise AssertionError("no script runs in these tests")

        return refuse

    def get(self, key: str) -> bytes | None:
        self.gets[key] += 1
        value = self.data.get(key)
        assert value is None or isinstance(value, bytes)
        return value

    def strlen(self, key: str) -> int:
        value = self.data.get(key)
        if value is not None and not isinstance(value, bytes):
            raise redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value")
        return len(value or b"")

    def set(self, key: str, value: str | bytes, ex: int | None = None) -> bool:
        self.data[key] = value.encode() if isinstance(value, str) else value
        return True

    def mget(self, keys: Sequence[str | bytes]) -> list[bytes | None]:
        return [self.get(k.decode() if isinstance(k, bytes) else k) for k in keys]

    def zrange(self, key: str, start: int, end: int) -> list[bytes]:
        return list(self.data.get(key, []))

    def lrange(self, key: str, start: int, end: int) -> list[bytes]:
        return list(self.data.get(key, []))[start:end + 1]

    def scan_iter(self, match: str, count: int) -> Iterator[bytes]:
        return iter([k.encode() for k in self.data if fnmatch.fnmatchcase(k, match)])

    def pubsub(self, **_: Any) -> Any:
        raise redis.ConnectionError("no pub/sub in these tests")
