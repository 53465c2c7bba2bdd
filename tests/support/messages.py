"""Consumed messages and small models for the per-message path, without a broker: what the
loop sees (``Msg``: the real message class cannot be built in Python), a two-feature model for
the hostile-input cases, and a model of the demo's six features for the fast-path cases."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np

from consumer.model import ActiveModel
from consumer.scoring import ScoringRules
from demo.generator import event_value, make_customers
from segmentation.bundle import Lineage, ModelBundle, Quality
from segmentation.events import CustomerEvent, InputContract
from segmentation.features import FeatureConfig, FeatureSpec, fit_spec
from segmentation.settings import DEFAULT_FEATURES

FUZZ_EXAMPLES = int(os.environ.get("SEG_FUZZ_EXAMPLES", "300"))
NOW_MS = 1_764_410_100_000  # 2025-11-29
TEN_YEARS_S = 10 * 365 * 86400.0
MAX_ID_CHARS = InputContract(()).max_id_chars


def key_of(value: bytes | None) -> bytes:
    """The key a well-behaved producer gives ``value``: its ``customer_id`` (UTF-8); ``b"k"`` when
    the value has none (garbage, a tombstone) or one too long to be valid (a hostile 500,000
    character id would make the message too large for the broker, not only for the contract)."""
    try:
        doc = json.loads(value or b"")
    except (ValueError, RecursionError):
        return b"k"
    customer = doc.get("customer_id") if isinstance(doc, dict) else None
    if not isinstance(customer, str) or len(customer) > MAX_ID_CHARS:
        return b"k"
    return customer.encode("utf-8", "surrogatepass")


@dataclass
class Msg:
    """A consumed message as the loop sees it, keyed by its customer_id unless ``_key`` is given."""

    _value: bytes | None
    _offset: int = 0
    _key: bytes | None | Literal["customer_id"] = "customer_id"
    _headers: list[tuple[str, bytes | None]] | None = None

    def __post_init__(self) -> None:
        if self._key == "customer_id":
            self._key = key_of(self._value)

    def topic(self) -> str:
        return "in"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes | None:
        return None if isinstance(self._key, str) else self._key

    def value(self) -> bytes | None:
        return self._value

    def headers(self) -> list[tuple[str, bytes | None]] | None:
        return self._headers


# --- two features, two segments: the hostile-input cases ---------------------------------------
FEATURES = ("a", "b")
MAX_RECORD = 50_000


def small_bundle(**overrides: object) -> dict[str, Any]:
    """A valid bundle as JSON-ready dict (``overrides`` replace top-level fields)."""
    spec = FeatureSpec(numeric=list(FEATURES), vocabulary={"channel": ["app", "other"]},
                       center=[0.0, 0.0], scale=[1.0, 1.0])
    bundle = ModelBundle(
        version=1, features=spec, centroids=[[0, 0, 1, 0], [5, 5, 0, 1]], segment_ids=[0, 1],
        segment_names=["x", "y"],
        quality=Quality(silhouette=0.5, davies_bouldin=0.5, inertia=1.0, shares=[0.5, 0.5],
                        sizes=[1, 1]),
        lineage=Lineage(topic="t"),
    )
    raw: dict[str, Any] = json.loads(bundle.to_json())
    raw.update(overrides)
    return raw


def clipped_bundle(**features: object) -> dict[str, Any]:
    """``small_bundle`` with a log on ``a`` and clip bounds (``features`` overrides them)."""
    clip = {"log_features": [FEATURES[0]], "clip_low": [-30.0, -1e12], "clip_high": [30.0, 1e12]}
    return small_bundle(features={**small_bundle()["features"], **clip, **features})


SMALL_MODEL = ActiveModel.of(ModelBundle.model_validate(small_bundle()))
SMALL_RULES = ScoringRules(
    InputContract(FEATURES, {f: (-1e12, 1e12) for f in FEATURES}, max_age_s=TEN_YEARS_S,
                  max_skew_s=3600.0, require_key_match=True),
    "out", "dlq", MAX_RECORD,
)


def event(**fields: object) -> bytes:
    """A valid event of the small model (``fields`` replace top-level fields)."""
    base: dict[str, object] = {"customer_id": "c-1", "event_time": NOW_MS, "event_id": "e-1",
                               "features": {"a": 1.0, "b": 2}, "attributes": {"channel": "app"}}
    base.update(fields)
    return json.dumps(base).encode()


# --- the demo's six features, five segments: the fast-path cases --------------------------------
DEMO_CONTRACT = InputContract(DEFAULT_FEATURES, {f: (-1e12, 1e12) for f in DEFAULT_FEATURES},
                              max_age_s=TEN_YEARS_S, max_skew_s=3600.0, require_key_match=True)


def demo_values(n: int, seed: int = 3) -> list[bytes]:
    """``n`` demo events of 200 customers, all at ``NOW_MS``."""
    rng = np.random.default_rng(seed)
    people = make_customers(200, rng)
    when = datetime.fromtimestamp(NOW_MS / 1000, tz=UTC)
    return [json.dumps(event_value(people[i % len(people)], rng, f"e-{i}", when)).encode()
            for i in range(n)]


def demo_model() -> ActiveModel:
    """Five segments fitted on demo events, with names that need JSON escaping."""
    events = [CustomerEvent.model_validate_json(v) for v in demo_values(2000, seed=4)]
    spec = fit_spec(events, FeatureConfig(DEFAULT_FEATURES, ("channel",), categorical_weight=0.5))
    x, _ = spec.encode(events)
    centroids = x[np.random.default_rng(0).choice(len(x), 5, replace=False)]
    bundle = ModelBundle(
        version=3, features=spec, centroids=centroids.tolist(), segment_ids=[0, 1, 2, 7, 9],
        segment_names=["Champions", 'quote " and \\ backslash', "é accents", "tab\there", "plain"],
        quality=Quality(silhouette=0.5, davies_bouldin=0.5, inertia=1.0, shares=[0.2] * 5, sizes=[1] * 5),
        lineage=Lineage(topic="t"),
    )
    return ActiveModel.of(bundle)


DEMO_MODEL = demo_model()
DEMO_RULES = ScoringRules(DEMO_CONTRACT, "out", "dlq", 1_000_000)
