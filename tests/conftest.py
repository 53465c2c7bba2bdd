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

# Modules whose tests share a module-scoped fixture (a private SASL broker; the quality sweeps'
# scenarios, a minute of fits) and may depend on their order: under pytest-xdist each runs whole
# on one worker, which builds the fixture once. Every other test is scheduled on its own.
SHARED_MODULES = ("tests/segmentation/test_sasl_acls.py", "tests/trainer/test_quality_gate.py")


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadgroup`` with SHARED_MODULES as groups. pytest-xdist 3.8 groups by renaming
    node ids, which pytest 9 no longer allows (its xdist_group marks are silently ignored), so the
    scope of a test is decided here, from its node id."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class ModuleGroups(LoadGroupScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::")[0]
            return module if module in SHARED_MODULES else super()._split_scope(nodeid)

    return ModuleGroups(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The ``integration`` marker is written on each test or module that needs the local stack
    (``make unit`` deselects them). A test that asks for the stack without it would fail `make
    unit` on a machine without the stack: refuse to run instead; and so would a module-scoped
    fixture outside SHARED_MODULES (built again on each pytest-xdist worker)."""
    unmarked = [item.nodeid for item in items if "stack" in getattr(item, "fixturenames", ())
                and item.get_closest_marker("integration") is None]
    if unmarked:
        raise pytest.UsageError(
            "mark these @pytest.mark.integration (they use the stack): " + ", ".join(unmarked))
    shared = set()
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        defs = info.name2fixturedefs.values() if info is not None else ()
        if any(d.scope in ("module", "package") for ds in defs for d in ds):
            shared.add(item.nodeid.split("::")[0])
    if shared - set(SHARED_MODULES):
        raise pytest.UsageError("add to SHARED_MODULES in tests/conftest.py (module-scoped fixtures): "
                                + ", ".join(sorted(shared - set(SHARED_MODULES))))


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
