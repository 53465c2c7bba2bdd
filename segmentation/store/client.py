"""Redis clients and the two error policies.

* An outage (``OUTAGE``: connection refused or reset, timeouts) is ridden out: callers that can
  go on without Redis catch it; the Kafka topics are the record of truth.
* ``best_effort`` is for calls whose failure must not stop the caller at all (the run log, the
  lease renewal, replica states): any ``RedisError`` (an outage, but also a key of the wrong
  type or an OOM reply from a full Redis) is logged and counted, and a default returned.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import redis
from pydantic import SecretStr
from redis.backoff import ExponentialBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from segmentation.domain import RedisOperation

log = logging.getLogger(__name__)

OUTAGE = (redis.ConnectionError, redis.TimeoutError)

T = TypeVar("T")


class ErrorCounter(Protocol):
    """A Prometheus counter with an ``operation`` label (``segment_redis_errors_total``)."""

    def labels(self, operation: str) -> Any: ...


def best_effort(
    operation: RedisOperation, call: Callable[[], T], default: T, errors: ErrorCounter | None = None
) -> T:
    """``call()``, or ``default`` if Redis fails in any way; the failure is logged with
    ``operation`` and counted in ``errors``.

    >>> def full() -> int:
    ...     raise redis.ResponseError("OOM command not allowed when used memory > 'maxmemory'")
    >>> best_effort("run_log", full, -1)
    -1
    """
    try:
        return call()
    except redis.RedisError as exc:
        log.warning("Redis call failed; going on without it",
                    extra={"operation": operation, "error": f"{type(exc).__name__}: {exc}"})
        if errors is not None:
            errors.labels(operation).inc()
        return default


class RedisSettings(Protocol):
    """What connecting to Redis reads (``Settings`` provides it)."""

    @property
    def redis_url(self) -> str: ...
    @property
    def redis_timeout_s(self) -> float: ...
    @property
    def redis_retries(self) -> int: ...
    @property
    def redis_username(self) -> str | None: ...
    @property
    def redis_password(self) -> SecretStr | None: ...
    @property
    def customer_redis_url(self) -> str | None: ...
    @property
    def customer_redis_cluster(self) -> bool: ...


def connect(settings: RedisSettings, url: str | None = None) -> redis.Redis:
    """A client (of ``url``, ``SEG_REDIS_URL`` by default) that retries connection errors with
    exponential backoff, a bounded number of times, and never blocks longer than the configured
    socket timeout per attempt."""
    return redis.Redis.from_url(
        url or settings.redis_url,
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
        health_check_interval=10,
        retry_on_error=list(OUTAGE),
        **_resilience(settings),
    )


def connect_customers(settings: RedisSettings) -> redis.Redis | RedisCluster:
    """The client for per-customer state: the model store's Redis, another one, or a Redis
    Cluster when one node cannot hold every customer."""
    url = settings.customer_redis_url or settings.redis_url
    if not settings.customer_redis_cluster:
        return connect(settings, url)
    return RedisCluster.from_url(
        url,
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
        **_resilience(settings),
    )


def _resilience(settings: RedisSettings) -> dict[str, Any]:
    """redis-py's own retry (exponential backoff, ``SEG_REDIS_RETRIES`` attempts) and the
    credentials, shared by the single-node and the cluster client.
    Username and password come from their own settings (the password is a secret, never in a
    URL that could be logged); a URL's own credentials apply when these are not set."""
    options: dict[str, Any] = {
        "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), settings.redis_retries),
    }
    if settings.redis_username is not None:
        options["username"] = settings.redis_username
    if settings.redis_password is not None:
        options["password"] = settings.redis_password.get_secret_value()
    return options


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
