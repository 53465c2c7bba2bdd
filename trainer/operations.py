"""Operator commands that act on published versions: rollback, reproduce, and the challenger's
promote and discard (with the automatic promotion `trainer run` applies)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import numpy as np
import redis
from confluent_kafka import KafkaException

from segmentation.bundle import BundleError, ModelBundle
from segmentation.features import FeatureConfig
from segmentation.matching import match_centroids
from segmentation.metrics import TrainerMetrics
from segmentation.model_log import ModelLogError
from segmentation.store import OUTAGE, ModelStore, PublishConflict, ReplicaStates, TrainerState
from trainer.challenger import ChallengerRefused, PromotionRule, clear_challenger, promotion_verdict, tally
from trainer.fit import KConfig
from trainer.models_topic import ModelTopic
from trainer.pipeline import accepted_baseline, data_hash, fit_window, load_base, publish, report_publish
from trainer.segment_ids import rollback_mapping
from trainer.window import Window, WindowConfig, read_window

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromotionConfig:
    """What making the challenger current depends on: the models topic, the trainer lease
    (``lock_ttl_s``) and the configured ``features`` a challenger must have."""

    models: ModelTopic
    lock_ttl_s: int
    features: FeatureConfig


@dataclass(frozen=True)
class ReproduceConfig:
    """What `reproduce` takes from the configuration rather than the version's lineage: how the
    window is read, and the K options and ``clip_margin`` a version from before they were recorded
    (schema 1, migrated) does not name. The feature kinds are the version's own."""

    window: WindowConfig
    k: KConfig
    clip_margin: float


def rollback(models: ModelTopic, features: FeatureConfig, store: ModelStore, version: int) -> int:
    """Republish ``version``'s model as a new version (versions only ever rise, so consumers
    that refuse to go back to an older version still follow a rollback).

    The model (scaler, centroids, segment ids and names, quality, lineage) is the old one's;
    the label mapping is recomputed against the version it replaces. Compare-and-set against
    the current version: a trainer publishing at the same moment makes one of the two fail."""
    models.sync(store)
    target = store.load(version)  # validated; raises BundleError if unusable
    target.check_compatible(features.numeric, features.categorical)
    base, current = load_base(store)
    if base == version:
        raise BundleError(f"v{version} is already current")
    bundle = target.model_copy(update={
        "version": store.allocate_version(),
        "created_at": datetime.now(UTC),
        "previous_version": base,
        "label_mapping": rollback_mapping(current, target),
        "rolled_back_from": version,
    })
    publish(models, store, bundle, base)
    pin(models, store, bundle.version)
    return bundle.version


def pin(models: ModelTopic, store: ModelStore, version: int | None) -> bool:
    """Hold (a version) or release (None) scheduled retrains: in the models topic first, then in
    Redis. Returns whether something was pinned before."""
    models.log().pin(version)
    state = TrainerState.of(store)
    if version is None:
        return state.unpin()
    was = state.pinned() is not None
    state.pin(version)
    return was


def sample_not_redrawn(window: Window, params: dict[str, Any]) -> str | None:
    """Why ``window`` does not hold the customers the run of ``params`` (a lineage's) trained on,
    or None when it does: it had no more customers than ``max_rows`` (every one is kept, whatever
    the key), or its key is the one the run recorded the hash of.

    >>> from trainer.window import SampleKey
    >>> key = SampleKey.of_secret("a deployment secret")
    >>> window = Window([], [], 0, 0, sampled=True, key=key)
    >>> sample_not_redrawn(window, {"sample": {"salt": "deployment", "salt_sha256": key.fingerprint}})
    >>> sample_not_redrawn(window, {"sample": {"salt": "run", "salt_sha256": "0" * 64}})[:60]
    'the window had more customers than max_rows, sampled with a '
    >>> sample_not_redrawn(Window([], [], 0, 0, sampled=False), {})
    """
    sample = params.get("sample")
    recorded = sample.get("salt_sha256") if isinstance(sample, dict) else None
    if not window.sampled or recorded == window.key.fingerprint:
        return None
    if isinstance(sample, dict) and sample.get("salt") == "run":
        key = "per-run secret key (SEG_SAMPLE_SALT was unset)"
    elif recorded is not None:
        key = "SEG_SAMPLE_SALT other than this one"
    else:
        key = "public salt (random_state, before sample keys were secret)"
    return (f"the window had more customers than max_rows, sampled with a {key}: the same "
            "customers cannot be drawn again")


def reproduce(config: ReproduceConfig, store: ModelStore, version: int, tolerance: float) -> dict[str, Any]:
    """Refit from the offsets recorded in ``version``'s lineage with its recorded parameters, and
    compare with the published centroids (matched up to a permutation). A window sampled with a
    key this process does not hold (``sample_not_redrawn``) is not reproduced, and says so."""
    bundle = store.load(version)
    params = bundle.lineage.params  # every one the schema requires (older bundles migrated)
    missing = sorted({"scaler", "clip_quantile", "categorical_weight", "feature_kinds", "vocabulary_max",
                      "vocabulary_min_count", "k"} - set(params))
    if missing:
        raise BundleError(f"v{version} does not record the fit parameters {missing}: it cannot be reproduced")
    numeric = tuple(bundle.features.numeric)
    features = FeatureConfig(
        numeric=numeric,
        categorical=tuple(bundle.features.vocabulary),
        kinds={n: k for n, k in params["feature_kinds"].items() if n in numeric},
        scaler=params["scaler"],
        # the features the run chose to log (configured, skewed, or kept from its predecessor)
        log_features=tuple(bundle.features.log_features),
        log_skewness=None,
        clip_quantile=params["clip_quantile"],
        # recorded since clipping was; a bundle from before has clip_quantile 0 and no use for it
        clip_margin=params.get("clip_margin", config.clip_margin),
        categorical_weight=params["categorical_weight"],
        vocabulary_min_count=params["vocabulary_min_count"],
        vocabulary_max=params["vocabulary_max"],
    )
    k_config = replace(
        config.k, k=params["k"], n_init=params.get("n_init", config.k.n_init),
        random_state=bundle.lineage.random_state,
        silhouette_sample=params.get("silhouette_sample", config.k.silhouette_sample),
        numeric_columns=len(numeric),
    )
    window_config = config.window.for_run(bundle.lineage.topic, numeric,
                                          params.get("max_rows", config.window.max_rows))
    window = read_window(window_config, now_ms=bundle.lineage.window_end_ms,
                         ranges=bundle.lineage.partitions)
    if window.rows_read != bundle.lineage.rows_read:
        return {"version": version, "reproduced": False,
                "rows_read": window.rows_read, "rows_recorded": bundle.lineage.rows_read,
                "detail": "the recorded offsets are no longer (all) retained by the topic"}
    not_redrawn = sample_not_redrawn(window, params)
    if not_redrawn is not None:
        return {"version": version, "reproduced": False, "rows_read": window.rows_read,
                "detail": not_redrawn}
    _, x, fit, _ = fit_window(features, k_config, window)
    published = bundle.centroid_array()
    pairs = match_centroids(published, fit.centroids, np.inf)
    max_diff = max((d for _, _, d in pairs), default=float("inf"))
    same_data = data_hash(x) == bundle.lineage.data_sha256
    return {
        "version": version,
        "reproduced": bool(same_data and max_diff <= tolerance and fit.k == bundle.k),
        "same_data_hash": same_data,
        "rows_used": len(window.events),
        "max_centroid_difference": max_diff,
        "tolerance": tolerance,
    }


def promote(config: PromotionConfig, store: ModelStore, metrics: TrainerMetrics) -> dict[str, Any]:
    """Make the challenger current: a normal publish of its bundle, with its own version, as a
    compare-and-set on the version it was trained against, under the trainer lease; then the
    slot is cleared. ``ChallengerRefused`` when there is none, or another model became current
    since it was trained (it would undo that model: discard it)."""
    models = config.models
    with TrainerState.of(store, metrics.redis_errors).lease(config.lock_ttl_s) as held:
        if not held:
            raise ChallengerRefused("the trainer lock is held by another trainer (or Redis could "
                                    "not give it); try again")
        models.sync(store)
        challenger = store.challenger()  # validated; an invalid one raises BundleError
        if challenger is None:
            raise ChallengerRefused("there is no challenger to promote")
        base, current = challenger.previous_version, store.current_version()
        if current == challenger.version:  # a promotion interrupted before the slot was cleared
            clear_challenger(models, store, "promoted", metrics)
            return _promotion(challenger, "was already current; the challenger slot is cleared")
        if current != base:
            raise ChallengerRefused(f"challenger v{challenger.version} was trained against v{base} "
                                    f"but v{current} is current; discard it")
        challenger.check_compatible(config.features.numeric, config.features.categorical)
        publish(models, store, challenger, base, metrics)
        clear_challenger(models, store, "promoted", metrics)
        report_publish(metrics, challenger, accepted_baseline(store, challenger))
    log.info("challenger promoted", extra={"version": challenger.version, "base": base})
    return _promotion(challenger, f"v{challenger.version} is current (it replaced v{base})")


def _promotion(challenger: ModelBundle, detail: str) -> dict[str, Any]:
    return {"promoted": challenger.version, "previous_version": challenger.previous_version,
            "k": challenger.k, "segment_ids": challenger.segment_ids, "detail": detail}


def discard(models: ModelTopic, store: ModelStore, metrics: TrainerMetrics) -> dict[str, Any]:
    """Drop the challenger: ``{"discarded": its version or None, "detail": ...}``. An empty slot
    is not an error; a slot holding something that is not a valid bundle is cleared too."""
    models.sync(store)
    try:
        challenger = store.challenger()
    except BundleError as exc:
        log.error("challenger slot invalid; cleared", extra={"error": str(exc)})
        clear_challenger(models, store, "discarded", metrics)
        return {"discarded": None, "detail": f"an invalid challenger was cleared ({exc})"}
    if challenger is None:
        return {"discarded": None, "detail": "there was no challenger"}
    clear_challenger(models, store, "discarded", metrics)
    log.info("challenger discarded", extra={"version": challenger.version})
    return {"discarded": challenger.version, "detail": f"challenger v{challenger.version} discarded"}


def auto_promote(config: PromotionConfig, rule: PromotionRule, store: ModelStore,
                 metrics: TrainerMetrics) -> dict[str, Any] | None:
    """The automatic ``rule`` `trainer run` applies (``promote_after`` > 0): promote the
    challenger once the replicas' reports about it pass ``promotion_verdict``; never while a
    rollback pins the current model. Returns what ``promote`` did, or None. Never raises: a
    failure is logged and the rule is checked again later."""
    if rule.promote_after <= 0:
        return None
    try:
        if TrainerState.of(store, metrics.redis_errors).pinned() is not None:
            return None
        challenger, current = store.challenger(), store.current_version()
    except (BundleError, *OUTAGE) as exc:
        log.debug("automatic promotion not checked", extra={"error": str(exc)})
        return None
    if challenger is None or challenger.previous_version != current:
        return None
    states = ReplicaStates.of(store, metrics.redis_errors).all()
    verdict = promotion_verdict(tally(states, challenger.version), rule.promote_after, rule.min_agreement)
    if not verdict.promote:
        return None
    log.info("promoting the challenger automatically", extra={"version": challenger.version,
                                                             "reason": verdict.reason})
    try:
        return {**promote(config, store, metrics), "reason": verdict.reason}
    except (ChallengerRefused, PublishConflict, BundleError, ModelLogError, KafkaException,
            redis.RedisError) as exc:
        log.warning("automatic promotion failed", extra={"version": challenger.version, "error": str(exc)})
        return None
