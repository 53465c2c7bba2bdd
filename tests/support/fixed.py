"""Customers at exact features, on the real stack: events without per-event noise (so which
segment a model gives each customer is known in advance), the segments a model assigns them, and
the changes topic as a subscriber reads it."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from consumer.model import ActiveModel
from demo.generator import FEATURES as DEMO_FEATURES
from demo.generator import Customer
from segmentation.cluster_metrics import nearest_two
from segmentation.events import CustomerEvent
from segmentation.metrics import TrainerMetrics
from segmentation.settings import Settings
from segmentation.store import ModelStore, connect
from tests.support.stack import Received, customers, produce_events, produce_raw, read_outputs, read_topic
from trainer.__main__ import train_config
from trainer.pipeline import train_once


def fixed_events(people: Sequence[Customer], prefix: str,
                 features: Callable[[Customer], np.ndarray] = lambda c: c.centre) -> list[tuple[str, bytes]]:
    """One event per customer at exactly ``features(customer)`` (no per-event noise), now."""
    when = int(time.time() * 1000)
    return [(c.customer_id, json.dumps({
        "customer_id": c.customer_id, "event_id": f"{prefix}-{i}", "event_time": when,
        "features": dict(zip(DEMO_FEATURES, np.round(features(c), 2).tolist(), strict=True)),
        "attributes": {"channel": c.channel},
    }).encode()) for i, c in enumerate(people)]


def segments(model: ActiveModel, messages: list[tuple[str, bytes]]) -> dict[str, int]:
    """Customer -> the segment id ``model`` assigns (what the consumer must emit)."""
    events = [CustomerEvent.model_validate_json(v) for _, v in messages]
    x, _ = model.bundle.features.encode(events)
    index, _, _ = nearest_two(x, model.centroids)
    return {e.customer_id: model.bundle.segment_ids[i] for e, i in zip(events, index.tolist(), strict=True)}


def send(settings: Settings, messages: list[tuple[str, bytes]]) -> dict[str, dict[str, Any]]:
    """Produce ``messages`` and wait until each has its output; returns them by event id."""
    produce_raw(settings, messages)
    ids = {json.loads(v)["event_id"] for _, v in messages}
    return {i: o for i, o in read_outputs(settings, ids, timeout_s=90).items() if i in ids}


def changes_for(
    settings: Settings, who: set[str], at_least: int = 0, timeout_s: float = 5.0,
) -> list[dict[str, object]]:
    """The changes topic (read_committed) for the customers in ``who``, once it holds
    ``at_least`` of them (or after ``timeout_s``: to see that nothing more arrives)."""
    def mine(rs: list[Received]) -> list[dict[str, object]]:
        return [r.json() for r in rs if (r.key or b"").decode() in who]

    assert settings.changes_topic is not None
    return mine(read_topic(settings, settings.changes_topic, lambda rs: len(mine(rs)) >= at_least > 0,
                           timeout_s if at_least == 0 else 60))


def trained(settings: Settings) -> tuple[ModelStore, ActiveModel]:
    produce_events(settings, customers(600), prefix="seed")
    store = ModelStore(connect(settings), settings.redis_prefix)
    assert train_once(train_config(settings), store, TrainerMetrics()).result == "published"
    bundle = store.load_current()
    assert bundle is not None
    return store, ActiveModel.of(bundle)


