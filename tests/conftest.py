"""Fixtures for tests against the real local stack (``make stack``); the helpers are in
``tests.support.stack``. Every test gets its own topics, consumer group and Redis prefix."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from segmentation.kafka import delete_topics, ensure_topics, project_topics
from segmentation.metrics import TrainerMetrics
from segmentation.settings import Settings
from segmentation.store import ModelStore, connect
from tests.support.stack import STACK_HINT, empty_redis, make_settings


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The ``integration`` marker is written on each test or module that needs the local stack
    (``make unit`` deselects them). A test that asks for the stack without it would fail `make
    unit` on a machine without the stack: refuse to run instead.

    Under pytest-xdist (``--dist loadgroup``) the tests sharing a module-scoped fixture (a private
    SASL broker, the quality sweeps' scenarios) go to one worker, which builds it once."""
    unmarked = [item.nodeid for item in items if "stack" in getattr(item, "fixturenames", ())
                and item.get_closest_marker("integration") is None]
    if unmarked:
        raise pytest.UsageError(
            "mark these @pytest.mark.integration (they use the stack): " + ", ".join(unmarked))
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        shared = info is not None and any(
            d.scope in ("module", "package") for defs in info.name2fixturedefs.values() for d in defs)
        if shared and item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))


@pytest.fixture(scope="session")
def stack() -> None:
    """Fails (never skips) when Kafka or Redis is down: these tests are the point."""
    try:
        redis.Redis(socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        pytest.fail(f"{STACK_HINT}: redis: {exc}")
    from confluent_kafka.admin import AdminClient

    try:
        AdminClient({"bootstrap.servers": "127.0.0.1:9092"}).list_topics(timeout=10)
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"{STACK_HINT}: kafka: {exc}")


@pytest.fixture
def settings_factory(stack: None) -> Iterator[Callable[..., Settings]]:
    made: list[Settings] = []

    def factory(**overrides: Any) -> Settings:
        s = make_settings(**overrides)
        ensure_topics(s)
        made.append(s)
        return s

    yield factory
    for s in made:
        delete_topics(s, project_topics(s))
        with contextlib.suppress(redis.RedisError):  # a test's private Redis server is already gone
            empty_redis(s)


@pytest.fixture
def settings(settings_factory: Callable[..., Settings]) -> Settings:
    return settings_factory()


@pytest.fixture
def store(settings: Settings) -> ModelStore:
    return ModelStore(connect(settings), settings.redis_prefix)


@pytest.fixture
def trainer_metrics() -> TrainerMetrics:
    return TrainerMetrics()
