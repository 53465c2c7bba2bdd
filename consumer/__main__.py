"""``python -m consumer``: score customer events with the current model, one group member.

SIGTERM/SIGINT: finish the batch, flush, commit, leave the group (bounded by
``shutdown_timeout_s``); a second signal exits at once.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

from confluent_kafka import Consumer, KafkaException, Producer

from consumer.delivery import AtLeastOnce, Delivery, DeliveryStopped, ExactlyOnce
from consumer.loop import ConsumeLoop
from segmentation import logs
from segmentation.kafka import consumer_config, ensure_topics, producer_config
from segmentation.metrics import ConsumerMetrics, serve
from segmentation.settings import Settings, load_settings
from segmentation.store import CustomerStore, ModelStore, connect

log = logging.getLogger("consumer")

EXIT_DELIVERY_STOPPED = 3
EXIT_KAFKA_FATAL = 4


class StopFlag:
    """First signal asks the loop to stop; a second one exits immediately; a watchdog bounds
    the graceful path."""

    def __init__(self, bound_s: float) -> None:
        self.requested = False
        self.bound_s = bound_s

    def __call__(self) -> bool:
        return self.requested

    def handle(self, signum: int, _frame: object) -> None:
        if self.requested:
            os._exit(128 + signum)
        self.requested = True
        log.info("stopping", extra={"signal": signal.Signals(signum).name})
        watchdog = threading.Timer(self.bound_s, lambda: os._exit(128 + signum))
        watchdog.daemon = True
        watchdog.start()


def build_delivery(settings: Settings, consumer: Consumer) -> Delivery:
    if settings.delivery == "exactly-once":
        tid = f"{settings.transactional_id}-{settings.replica_id}"
        return ExactlyOnce(Producer(producer_config(settings, tid)), consumer, settings.delivery_timeout_s)
    return AtLeastOnce(Producer(producer_config(settings)), consumer, settings.delivery_timeout_s)


def main() -> int:
    settings = load_settings()
    logs.configure(settings.log_level, settings.log_json)
    stop = StopFlag(settings.shutdown_timeout_s)
    signal.signal(signal.SIGTERM, stop.handle)
    signal.signal(signal.SIGINT, stop.handle)
    redis_client = connect(settings)
    metrics = ConsumerMetrics()
    try:
        ensure_topics(settings)
        consumer = Consumer(consumer_config(settings, settings.delivery == "exactly-once"))
        delivery = build_delivery(settings, consumer)
    except KafkaException as exc:  # broker unreachable, not authorised, transactions refused
        log.error("cannot start: Kafka refused the setup", extra={"error": str(exc)})
        return EXIT_KAFKA_FATAL
    loop = ConsumeLoop(
        settings, consumer, delivery, ModelStore(redis_client, settings.redis_prefix),
        CustomerStore.for_settings(settings), metrics,
    )
    if settings.metrics_port:
        serve(metrics.registry, settings.metrics_port, ready=lambda: loop.ready)
    log.info("consumer starting", extra={"group": settings.consumer_group,
                                         "delivery": settings.delivery,
                                         "replica": settings.replica_id})
    try:
        loop.run(stop)
    except DeliveryStopped as exc:
        log.error("stopping: outputs cannot be written; the batch's offsets stay uncommitted",
                  extra={"error": str(exc)})
        return EXIT_DELIVERY_STOPPED
    except KafkaException as exc:  # fatal client error (e.g. fenced by a newer instance)
        log.error("stopping: Kafka client error", extra={"error": str(exc)})
        return EXIT_KAFKA_FATAL
    finally:
        loop.close()
        log.info("consumer stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
