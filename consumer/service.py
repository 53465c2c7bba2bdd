"""The consumer process: wiring, signals, exit statuses (``python -m consumer`` runs ``main``).

SIGTERM/SIGINT: finish the batch, flush, commit, leave the group (bounded by
``shutdown_timeout_s``); a second signal exits at once. Signals are received by a thread of
their own, so they are honoured even while the loop is inside a blocking Kafka client call.
A step that stays inside the client for longer than ``stall_bound_s`` ends the process
(status 5) so that a supervisor restarts it and the uncommitted batch is replayed.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from confluent_kafka import Consumer, KafkaException, Producer

from consumer.changes import ChangesConfig, ModelOf, SegmentChanges
from consumer.customer_writer import CustomerWriter
from consumer.delivery import EXIT_STALLED, AtLeastOnce, Delivery, DeliveryStopped, ExactlyOnce
from consumer.learner import Learner
from consumer.loop import ConsumeLoop, LoopConfig
from consumer.scoring import ScoringRules
from consumer.telemetry import Reporter
from consumer.watcher import ModelsTopic, ModelWatcher, WatcherConfig
from segmentation import logs
from segmentation.kafka import (
    NotCoPartitioned,
    TopicReader,
    check_co_partitioned,
    consumer_config,
    ensure_topics,
    producer_config,
)
from segmentation.metrics import ConsumerMetrics, serve
from segmentation.model_log import read_registry, sync_store
from segmentation.readback import Readback
from segmentation.settings import Settings, load_settings
from segmentation.store import CustomerStore, ModelStore, RedisRefused, check_redis, connect

log = logging.getLogger("consumer")

EXIT_SETTINGS = 2
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


def receive_signals(stop: StopFlag) -> None:
    """Block SIGTERM/SIGINT in every thread (call before any client starts its threads) and
    receive them in a thread of their own: Python runs handlers only between bytecodes of the
    main thread, which can sit for minutes inside one librdkafka call when a broker is gone."""
    signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)  # consumer/__main__ did it before any thread

    def wait() -> None:
        while True:
            stop.handle(signal.sigwait(signals), None)

    threading.Thread(target=wait, name="signals", daemon=True).start()


def watch_for_stalls(loop: ConsumeLoop, bound_s: float) -> None:
    """End the process when one step has not returned for ``bound_s`` (a librdkafka call that
    ignores its timeout while the group coordinator is gone): nothing is committed, and the
    restart replays the batch."""

    def watch() -> None:
        while True:
            time.sleep(min(5.0, bound_s / 4))
            started = loop.step_started
            if started is not None and time.monotonic() - started > bound_s:
                log.error("stopping: one step has been inside the Kafka client too long; exiting so "
                          "that a restart replays the uncommitted batch",
                          extra={"stalled_s": round(time.monotonic() - started)})
                logging.shutdown()
                os._exit(EXIT_STALLED)

    threading.Thread(target=watch, name="stall-watchdog", daemon=True).start()


# --- what each component reads of the settings (only this module sees Settings) -------------
def loop_config(settings: Settings) -> LoopConfig:
    return LoopConfig(settings.events_topic, settings.batch_size, settings.batch_timeout_s,
                      settings.exactly_once, settings.shutdown_timeout_s)


def scoring_rules(settings: Settings) -> ScoringRules:
    return ScoringRules(settings.input_contract(), settings.segments_topic, settings.dlq_topic,
                        settings.max_record_bytes)


def watcher_config(settings: Settings) -> WatcherConfig:
    return WatcherConfig(tuple(settings.features), tuple(settings.categorical), settings.model_poll_s)


def changes_config(settings: Settings) -> ChangesConfig:
    return ChangesConfig(settings.changes_topic, settings.delivery_timeout_s, settings.max_id_chars)


def build_loop(
    settings: Settings, consumer: Consumer, delivery: Delivery, store: ModelStore, customers: CustomerStore,
    metrics: ConsumerMetrics,
) -> ConsumeLoop:
    """The consume loop and its stages, each given only the settings it reads."""
    store.readback = Readback.of(settings, metrics.readback_rejected)  # refusals counted here
    watcher = build_watcher(settings, store, metrics)
    return ConsumeLoop(
        loop_config(settings), consumer, delivery, scoring_rules(settings), watcher,
        build_changes(settings, metrics, watcher.model_of),
        Learner(settings.half_life_events, settings.random_state, metrics),
        Reporter(settings.replica_id, consumer, store, metrics), CustomerWriter(customers, metrics), metrics,
    )


def build_watcher(settings: Settings, store: ModelStore, metrics: ConsumerMetrics) -> ModelWatcher:
    """The model watcher, with the models topic bound to this process's Kafka connection."""
    models_topic = ModelsTopic(read=lambda readback: read_registry(settings, readback=readback),
                               sync=lambda store: sync_store(settings, store))
    return ModelWatcher(watcher_config(settings), store, metrics, models_topic)


def build_changes(settings: Settings, metrics: ConsumerMetrics, model_of: ModelOf) -> SegmentChanges:
    """The segment-changes stage, reading the changes topic with this process's Kafka connection."""
    return SegmentChanges(changes_config(settings), lambda: TopicReader(settings, "changes-restore"),
                          Readback.of(settings, metrics.readback_rejected), metrics, model_of)


def build_delivery(settings: Settings, consumer: Consumer) -> Delivery:
    if settings.exactly_once:
        tid = f"{settings.transactional_id}-{settings.replica_id}"

        def new_producer() -> Producer:
            return Producer(producer_config(settings, tid, reports="errors"))

        return ExactlyOnce(new_producer(), consumer, settings.delivery_timeout_s, new_producer=new_producer)
    producer = Producer(producer_config(settings, reports="errors"))
    return AtLeastOnce(producer, consumer, settings.delivery_timeout_s)


def main() -> int:
    settings = load_settings()
    logs.configure(settings.log_level, settings.log_json)
    stop = StopFlag(settings.shutdown_timeout_s)
    receive_signals(stop)
    redis_client = connect(settings)
    try:
        check_redis(redis_client)
    except RedisRefused as exc:
        log.error(f"cannot start: {exc}")
        return EXIT_SETTINGS
    metrics = ConsumerMetrics()
    try:
        ensure_topics(settings)
        check_co_partitioned(settings)
        consumer = Consumer(consumer_config(settings, settings.exactly_once))
        delivery = build_delivery(settings, consumer)
    except NotCoPartitioned as exc:
        log.error(f"cannot start: {exc}")
        return EXIT_SETTINGS
    except KafkaException as exc:  # broker unreachable, not authorised, transactions refused
        log.error("cannot start: Kafka refused the setup", extra={"error": str(exc)})
        return EXIT_KAFKA_FATAL
    loop = build_loop(
        settings, consumer, delivery, ModelStore(redis_client, settings.redis_prefix),
        CustomerStore.for_settings(settings), metrics,
    )
    watch_for_stalls(loop, 2 * settings.delivery_timeout_s + 60)
    if settings.metrics_port:
        serve(metrics.registry, settings.metrics_port, ready=lambda: loop.ready, host=settings.metrics_host)
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

