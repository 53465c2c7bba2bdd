"""All settings of the consumer, the trainer and the demo: one frozen object, env prefix ``SEG_``.

Defaults point at the local stack (``make stack``). List and dict settings are read from the
environment as JSON, e.g. ``SEG_FEATURES='["recency_days","monetary_90d"]'`` or
``SEG_KAFKA_EXTRA='{"security.protocol":"SASL_SSL"}'``.
"""

from __future__ import annotations

import os
import socket
import uuid
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from segmentation.events import InputContract
from segmentation.features import FeatureKind

DEFAULT_FEATURES = (
    "recency_days",
    "frequency_90d",
    "monetary_90d",
    "avg_basket_value",
    "sessions_30d",
    "tenure_days",
)

MIN_SALT_CHARS = 16  # SEG_SAMPLE_SALT: a secret (its hash is recorded in every bundle)

# Kinds of the demo's features and of the usual per-customer RFM features.
DEFAULT_FEATURE_KINDS: dict[str, FeatureKind] = {
    "recency_days": "recency",
    "frequency_90d": "count",
    "frequency_365d": "count",
    "monetary_90d": "money",
    "monetary_365d": "money",
    "avg_basket_value": "money",
    "sessions_30d": "count",
    "tenure_days": "tenure",
    "items_per_purchase": "ratio",
}


class FeatureDeclaration(BaseModel):
    """One numeric feature, declared whole in ``SEG_FEATURES``: its name, its kind (the transform
    follows from it), its valid range, and whether it is always logged. The input contract, the
    fit, the bundle and ``trainer reproduce`` all derive from it (``Settings.features``,
    ``feature_kinds``, ``feature_bounds``, ``log_features``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    kind: FeatureKind = "other"
    bounds: tuple[float, float] | None = None
    log: bool = False


def _declared(data: Any) -> Any:
    """``SEG_FEATURES`` entries that are declarations (objects), split into the settings they
    stand for; an explicit entry in ``feature_kinds``/``feature_bounds`` that contradicts a
    declaration is an error.

    >>> out = _declared({"features": ["a", {"name": "b", "kind": "count", "bounds": [0, 9], "log": True}]})
    >>> out["features"], out["feature_kinds"]["b"], out["feature_bounds"], out["log_features"]
    (['a', 'b'], 'count', {'b': (0.0, 9.0)}, ['b'])
    """
    if not isinstance(data, dict) or not isinstance(data.get("features"), list | tuple):
        return data
    entries = data["features"]
    if all(isinstance(e, str) for e in entries):
        return data
    try:
        declared = [e if isinstance(e, str) else _declaration(i, e) for i, e in enumerate(entries)]
    except ValueError:
        return data  # the features field says what is wrong (``Settings._features_named``)
    out = dict(data)
    kinds = dict(out.get("feature_kinds") or DEFAULT_FEATURE_KINDS)
    bounds = dict(out.get("feature_bounds") or {})
    logged = list(out.get("log_features") or ())
    for d in declared:
        if isinstance(d, str):
            continue
        if d.name in (out.get("feature_kinds") or {}) and kinds[d.name] != d.kind:
            raise ValueError(f"feature {d.name}: kind {d.kind} declared, {kinds[d.name]} in feature_kinds")
        kinds[d.name] = d.kind
        if d.bounds is not None:
            bounds[d.name] = (float(d.bounds[0]), float(d.bounds[1]))
        if d.log and d.name not in logged:
            logged.append(d.name)
    out.update(features=[d if isinstance(d, str) else d.name for d in declared], feature_kinds=kinds,
               feature_bounds=bounds, log_features=logged)
    return out


def _declaration(index: int, entry: Any) -> FeatureDeclaration:
    try:
        return FeatureDeclaration.model_validate(entry)
    except ValidationError as exc:
        why = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'entry'}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"features[{index}] is neither a name nor a declaration ({why})") from None


class Settings(BaseSettings):
    """Every tunable of the service. Built once in ``main()`` and passed down."""

    model_config = SettingsConfigDict(
        env_prefix="SEG_", frozen=True, extra="ignore", env_parse_none_str="null"
    )

    # --- Kafka ---------------------------------------------------------------------------
    kafka_bootstrap: str = Field("127.0.0.1:9092", description="bootstrap.servers")
    kafka_extra: dict[str, str] = Field(
        default_factory=dict,
        description="librdkafka options passed through to every client (JSON object)",
    )
    kafka_password: SecretStr | None = Field(None, description="sasl.password, never logged")
    events_topic: str = Field("customer-events", description="input topic")
    segments_topic: str = Field("customer-segments", description="output topic")
    dlq_topic: str = Field("customer-events-dlq", description="dead-letter topic")
    models_topic: str = Field("segment-models", description="compacted model audit topic")
    changes_topic: str | None = Field(
        "customer-segment-changes",
        description="compacted topic of segment changes per customer, partitioned as the input; "
        "null = no change events",
    )
    events_partitions: int = Field(6, ge=1, description="partitions when the project creates it")
    consumer_group: str = Field("segmentation-consumer", description="consumer group.id")

    # --- Redis ---------------------------------------------------------------------------
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis URL")
    redis_prefix: str = Field("seg", description="namespace of every Redis key and channel")
    redis_username: str | None = Field(None, description="Redis ACL user (e.g. `seg`); none: default user")
    redis_password: SecretStr | None = Field(None, description="Redis password, never logged")
    redis_timeout_s: float = Field(1.0, gt=0, description="socket timeout for Redis calls")
    redis_retries: int = Field(2, ge=0, description="retries (exponential backoff) per Redis call")
    customer_redis_url: str | None = Field(
        None, description="Redis for per-customer state; null = SEG_REDIS_URL"
    )
    customer_redis_cluster: bool = Field(
        False, description="per-customer state on a Redis Cluster (SEG_CUSTOMER_REDIS_URL names one node)"
    )
    customer_ttl_s: int = Field(
        30 * 86400, ge=0,
        description="TTL of per-customer state (evictable when Redis is full); 0 = none (never evicted)",
    )

    # --- Features ------------------------------------------------------------------------
    features: tuple[str, ...] = Field(
        DEFAULT_FEATURES,
        description='numeric features used: names, or whole declarations {"name", "kind", "bounds": '
        '[min, max], "log"} (one entry adds a feature: see docs/operations.md)',
    )
    categorical: tuple[str, ...] = Field(("channel",), description="categorical attributes")
    scaler: Literal["standard", "robust"] = Field("standard", description="feature scaler")
    feature_bounds: dict[str, tuple[float, float]] = Field(
        default_factory=dict,
        description='valid [min, max] per feature, e.g. {"recency_days": [0, 3650]}; else +/-max_abs_feature',
    )
    max_abs_feature: float = Field(
        1e12, gt=0, le=1e15, description="largest magnitude accepted for a feature without explicit bounds"
    )
    categorical_weight: float = Field(
        0.5, gt=0, description="value of a set one-hot column (1 = as far apart as 1 std dev x sqrt 2)"
    )
    feature_kinds: dict[str, FeatureKind] = Field(
        default_factory=lambda: dict(DEFAULT_FEATURE_KINDS),
        description="numeric feature -> count, money, duration, ratio, recency, tenure or other "
        "(the transform follows from it; recency and tenure grow with the calendar); a feature "
        "not listed is other, a listed name that is not a feature is ignored",
    )
    log_features: tuple[str, ...] = Field(
        (), description="features always given a signed log1p before scaling (heavy-tailed spend)"
    )
    log_skewness: float | None = Field(
        1.2, gt=0,
        description="also log a feature whose window skewness is above this (and the log lowers it); "
        "null = only log_features",
    )
    clip_quantile: float = Field(
        0.005, ge=0, lt=0.5,
        description="clip each numeric feature at this training quantile and 1 minus it, widened by "
        "clip_margin; 0 = no clipping",
    )
    clip_margin: float = Field(
        0.5, ge=0, description="widening of the clip range, in units of the range between the quantiles "
        "(after the log); rows beyond it are outside the training envelope and left out of the fit"
    )
    vocabulary_max: int = Field(
        20, ge=1, le=1000, description="most values per categorical attribute (top by count; rest: other)"
    )
    vocabulary_min_count: int = Field(
        5, ge=1, description="a categorical value needs this many window rows to get its own column"
    )

    # --- Input bounds (anything outside is a dead letter with its own reason) ---------------
    max_message_bytes: int = Field(
        65_536, ge=1024, le=900_000, description="largest input message (key + value); else too_large"
    )
    max_id_chars: int = Field(
        256, ge=1, le=10_000, description="longest customer_id / event_id; else too_long"
    )
    max_attribute_chars: int = Field(
        256, ge=1, le=10_000, description="longest attribute key or value; else too_long"
    )
    max_fields: int = Field(
        256, ge=1, le=10_000, description="most entries in features or attributes; else too_long"
    )
    max_event_age_s: float = Field(
        10 * 365 * 86400.0, gt=0,
        description="oldest accepted event_time, seconds before now; else event_time_out_of_range",
    )
    max_event_skew_s: float = Field(
        3600.0, ge=0, description="how far event_time may be ahead of now; else event_time_out_of_range"
    )
    require_key_match: bool = Field(
        True, description="the Kafka key must be the event's customer_id (UTF-8), else key_mismatch: one "
        "customer's events must share one partition, where their state lives; false only while producers "
        "are fixed"
    )

    # --- Trainer -------------------------------------------------------------------------
    k: int | None = Field(
        None, ge=2, description="fixed K; null (the default) chooses K over k_min..k_max, or one segment"
    )
    k_min: int = Field(2, ge=2, description="smallest K tried when choosing K")
    k_max: int = Field(10, ge=2, description="largest K tried when choosing K")
    n_init: int = Field(10, ge=1, description="k-means++ restarts")
    random_state: int = Field(42, description="seed of every fit (the window sample is keyed by sample_salt)")
    sample_salt: SecretStr | None = Field(
        None,
        description="secret key of the window sample's hashes, one per deployment (at least 16 "
        "random characters; only its hash is recorded); null = a fresh random key per run, whose "
        "sample `reproduce` cannot draw again",
    )
    window_s: int = Field(3600, gt=0, description="training window, seconds back from now")
    max_rows: int = Field(50_000, ge=10, description="row cap; larger windows are sampled")
    min_rows: int = Field(200, ge=2, description="rows needed before the first fit")
    silhouette_sample: int = Field(5000, ge=100, description="rows in the sampled silhouette")
    stability_sample: int = Field(
        2000, ge=100, description="rows per subsample in the stability check of an automatic K"
    )
    train_interval_s: float = Field(600.0, gt=0, description="seconds between retrains")
    names_file: str | None = Field(None, description="JSON file mapping segment_id to name")
    lock_ttl_s: int = Field(120, gt=0, description="trainer lease lock TTL")
    # quality gate
    gate_min_share: float = Field(0.01, ge=0, lt=1, description="smallest segment share")
    gate_min_separation: float = Field(
        0.2, ge=0, description="min centroid distance / median centroid distance"
    )
    gate_silhouette_margin: float = Field(
        0.05, ge=0, description="max silhouette drop vs the current model on the same window"
    )
    gate_min_spread_separation: float | None = Field(
        None, ge=0,
        description="min distance of the two closest segments in standard deviations of their pooled "
        "within-cluster covariance (one population cut in two: ~2.65); null: off",
    )
    gate_min_silhouette: float | None = Field(
        0.25, ge=-1, le=1, description="silhouette floor of a refit; null: off"
    )
    gate_max_davies_bouldin: float | None = Field(
        1.5, gt=0, description="Davies-Bouldin ceiling of a refit; null: off"
    )
    gate_max_silhouette_drop: float | None = Field(
        0.1, ge=0,
        description="max silhouette drop below the last accepted model's training silhouette; null: off",
    )
    gate_max_davies_bouldin_rise: float | None = Field(
        0.3, ge=0,
        description="max Davies-Bouldin rise above the last accepted model's training figure; null: off",
    )
    gate_silhouette_budget: float | None = Field(
        0.3, ge=0, le=1,
        description="total silhouette drop allowed below the anchor (the last operator-accepted or "
        "the first model), as a fraction of the anchor's silhouette; the smaller of this and "
        "gate_max_silhouette_drop applies; null: only gate_max_silhouette_drop",
    )
    gate_max_structural_share: float | None = Field(
        0.05, ge=0, le=1,
        description="share of the customers a retrain's splits, merges, births and retirements may "
        "move without `trainer once --accept`; null: off",
    )
    match_threshold: float = Field(
        0.5, gt=0, description="max matching distance / median centroid distance to keep an id"
    )
    match_max_spread: float = Field(
        3.0, gt=0,
        description="max move of a centroid, in standard deviations of the new segment's "
        "within-cluster covariance (Mahalanobis), to keep its id",
    )
    drift_retrain_threshold: float = Field(
        0.1, gt=0, description="silhouette drop reported by consumers that triggers a retrain"
    )
    drift_retrain_after_s: float = Field(
        120.0, ge=0,
        description="how long the silhouette drift or the novelty share must last before the early retrain",
    )
    novelty_retrain_share: float | None = Field(
        0.03, gt=0, le=1,
        description="share of recent events beyond their segment's training 99th-percentile distance "
        "(normally about 0.01), reported by consumers, that triggers a retrain; null: off",
    )
    # challenger models
    challenger: bool = Field(
        False,
        description="scheduled retrains publish a challenger (scored by consumers in the shadow "
        "of the current model) instead of a new current version",
    )
    challenger_promote_after: int = Field(
        0, ge=0,
        description="`trainer run` promotes the challenger once replicas scored this many events "
        "with it and agreement and silhouette hold; 0 = never automatically",
    )
    challenger_min_agreement: float = Field(
        0.9, ge=0, le=1,
        description="share of events the challenger must assign to the champion's segment id "
        "for the automatic promotion",
    )

    # --- Consumer ------------------------------------------------------------------------
    batch_size: int = Field(500, ge=1, description="max messages per batch")
    batch_timeout_s: float = Field(0.5, gt=0, description="max wait to fill a batch")
    delivery: Literal["at-least-once", "exactly-once"] = Field(
        "at-least-once", description="delivery guarantee"
    )
    transactional_id: str = Field(
        default_factory=lambda: f"segmentation-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}",
        description="transactional.id (exactly-once); unique per process unless set",
    )
    max_record_bytes: int = Field(
        1_000_000, ge=10_000, description="largest record produced (producer message.max.bytes)"
    )
    max_bundle_bytes: int = Field(
        1_000_000, ge=65_536, le=64 << 20,
        description="largest model bundle (JSON) the trainer publishes and any reader parses; a larger "
        "one is refused unread (too_large). At most max_record_bytes: a bundle is a models-topic record",
    )
    delivery_timeout_s: float = Field(
        60.0, gt=0, lt=290,
        description="how long one batch's retriable delivery errors are retried before it is replayed",
    )
    commit_interval_ms: int = Field(1000, gt=0, description="offset commit interval")
    model_poll_s: float = Field(5.0, gt=0, description="model pointer poll (besides pub/sub)")
    half_life_events: float = Field(
        5000.0, gt=0, description="online k-means forgetting half-life, in events"
    )
    shutdown_timeout_s: float = Field(10.0, gt=0, description="bound on graceful shutdown")
    replica_id: str = Field(default_factory=socket.gethostname, description="replica name")

    # --- Metrics / logs ------------------------------------------------------------------
    metrics_port: int = Field(0, ge=0, description="/metrics, /healthz, /readyz port; 0 = off")
    metrics_host: str = Field(
        "127.0.0.1", description="address the metrics server binds (0.0.0.0 in the image)"
    )
    log_json: bool = Field(False, description="JSON log lines")
    log_level: str = Field("INFO", description="log level")

    @model_validator(mode="before")
    @classmethod
    def _feature_declarations(cls, data: Any) -> Any:
        return _declared(data)

    @field_validator("features", mode="before")
    @classmethod
    def _features_named(cls, v: Any) -> Any:
        """A declaration left here could not be read: say why (as ``SEG_FEATURES``)."""
        for i, entry in enumerate(v if isinstance(v, list | tuple) else ()):
            if not isinstance(entry, str):
                _declaration(i, entry)
        return v

    @field_validator("features")
    @classmethod
    def _features_nonempty_unique(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("at least one numeric feature is required")
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate feature names in {v}")
        return v

    @field_validator("sample_salt")
    @classmethod
    def _salt_long_enough(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and len(v.get_secret_value()) < MIN_SALT_CHARS:
            raise ValueError(f"must have at least {MIN_SALT_CHARS} characters (a random secret)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.k_min > self.k_max:
            raise ValueError(f"k_min ({self.k_min}) > k_max ({self.k_max})")
        unknown = set(self.log_features) - set(self.features)
        if unknown:
            raise ValueError(f"log_features not in features: {sorted(unknown)}")
        unknown = set(self.feature_bounds) - set(self.features)
        if unknown:
            raise ValueError(f"feature_bounds not in features: {sorted(unknown)}")
        timeout = self.kafka_extra.get("message.timeout.ms")
        if timeout is not None and not (timeout.isdigit() and 0 < int(timeout) <= 120_000):
            # every record must get its delivery report in bounded time: the delivery policy
            # waits for all of them before retrying, so that no second copy is ever in flight
            raise ValueError(f"kafka_extra message.timeout.ms must be 1..120000, not {timeout!r}")
        if self.max_bundle_bytes > self.max_record_bytes:
            raise ValueError(f"max_bundle_bytes ({self.max_bundle_bytes}) > max_record_bytes "
                             f"({self.max_record_bytes}): a bundle must fit in a models-topic record")
        for name, (low, high) in self.feature_bounds.items():
            if not low < high:
                raise ValueError(f"feature_bounds[{name}]: min {low} must be < max {high}")
        return self

    @property
    def exactly_once(self) -> bool:
        """Outputs and offsets committed in one Kafka transaction (``delivery="exactly-once"``);
        otherwise offsets are stored after acknowledgement and committed by the client."""
        return self.delivery == "exactly-once"

    def feature_limits(self) -> dict[str, tuple[float, float]]:
        """Valid range of every numeric feature: out-of-range values are dead-lettered (consumer)
        and skipped (trainer) rather than allowed to overflow the scaler."""
        default = (-self.max_abs_feature, self.max_abs_feature)
        return {name: self.feature_bounds.get(name, default) for name in self.features}

    def input_contract(self) -> InputContract:
        """The bounds every input message is checked against, in the consumer and the trainer."""
        return InputContract(
            features=self.features, bounds=self.feature_limits(),
            max_message_bytes=self.max_message_bytes, max_id_chars=self.max_id_chars,
            max_attribute_chars=self.max_attribute_chars, max_fields=self.max_fields,
            max_age_s=self.max_event_age_s, max_skew_s=self.max_event_skew_s,
            require_key_match=self.require_key_match,
        )

    def kafka_common(self) -> dict[str, str | int | float | bool]:
        """librdkafka options shared by every client (passed-through extras win)."""
        conf: dict[str, str | int | float | bool] = {"bootstrap.servers": self.kafka_bootstrap}
        conf.update(self.kafka_extra)
        if self.kafka_password is not None:
            conf["sasl.password"] = self.kafka_password.get_secret_value()
        return conf


def load_settings() -> Settings:
    """Settings from the environment, or exit with one readable line per wrong setting."""
    try:
        return Settings()
    except SettingsError as exc:  # a list/dict setting that is not JSON
        raise SystemExit(f"invalid settings: {exc} (lists and dicts are JSON)") from None
    except ValidationError as exc:
        lines = []
        for error in exc.errors(include_url=False):
            name = "SEG_" + "_".join(str(p) for p in error["loc"][:1]).upper()
            lines.append(f"  {name}: {error['msg']}")
        raise SystemExit("invalid settings:\n" + "\n".join(lines)) from None
