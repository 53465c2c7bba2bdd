"""The write stage: each scored customer's latest segment to Redis, on a thread of its own.

Best effort: the output topic is the record of truth; Redis holds a hot copy that the next event
of the customer refreshes. A failed write is counted (and logged unless Redis is merely
unreachable) and dropped; it never fails the batch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import redis

from segmentation.customer import CustomerAssignment
from segmentation.metrics import ConsumerMetrics
from segmentation.store import OUTAGE, CustomerStore, PartialWrite

log = logging.getLogger(__name__)


class CustomerWriter:
    def __init__(self, customers: CustomerStore, metrics: ConsumerMetrics) -> None:
        self.customers = customers
        self.metrics = metrics
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="customer-writes")

    def submit(self, customers: Sequence[CustomerAssignment]) -> Future[None]:
        """Write ``customers`` after those submitted before; the future never raises."""
        return self._thread.submit(self.write, customers)

    def write(self, customers: Sequence[CustomerAssignment]) -> None:
        if not customers:
            return
        try:
            self.customers.write_latest(customers)
        except redis.RedisError as exc:  # unreachable, but also full (OOM) or read-only
            self.metrics.redis_errors.labels("customer_write").inc()
            skipped = exc.failed if isinstance(exc, PartialWrite) else len(customers)
            self.metrics.customer_writes_skipped.inc(skipped)
            if not isinstance(exc, OUTAGE):
                log.error("customer writes refused by Redis", extra={"error": str(exc)})

    def close(self) -> None:
        """Wait for the writes submitted."""
        self._thread.shutdown(wait=True)
