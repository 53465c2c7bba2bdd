"""Operator commands that act on published versions: rollback and reproduce."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import numpy as np

from segmentation.bundle import BundleError
from segmentation.matching import match_centroids
from segmentation.model_log import ModelLog, sync_store
from segmentation.settings import Settings
from segmentation.store import ModelStore, TrainerState
from trainer.labels import rollback_mapping
from trainer.pipeline import data_hash, fit_window, load_base, publish
from trainer.window import read_window


def rollback(settings: Settings, store: ModelStore, version: int) -> int:
    """Republish ``version``'s model as a new version (versions only ever rise, so consumers
    that refuse to go back to an older version still follow a rollback).

    The model (scaler, centroids, segment ids and names, quality, lineage) is the old one's;
    the label mapping is recomputed against the version it replaces. Compare-and-set against
    the current version: a trainer publishing at the same moment makes one of the two fail."""
    sync_store(settings, store)
    target = store.load(version)  # validated; raises BundleError if unusable
    target.check_compatible(settings.features, settings.categorical)
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
    publish(settings, store, bundle, base)
    pin(settings, store, bundle.version)
    return bundle.version


def pin(settings: Settings, store: ModelStore, version: int | None) -> bool:
    """Hold (a version) or release (None) scheduled retrains: in the models topic first, then in
    Redis. Returns whether something was pinned before."""
    ModelLog(settings).pin(version)
    state = TrainerState.of(store)
    if version is None:
        return state.unpin()
    was = state.pinned() is not None
    state.pin(version)
    return was


def reproduce(settings: Settings, store: ModelStore, version: int, tolerance: float) -> dict[str, Any]:
    """Refit from the offsets recorded in ``version``'s lineage with its recorded parameters, and
    compare with the published centroids (matched up to a permutation)."""
    bundle = store.load(version)
    params = bundle.lineage.params
    fit_settings = settings.model_copy(update={
        "k": params.get("k", bundle.k),
        "n_init": params.get("n_init", settings.n_init),
        "max_rows": params.get("max_rows", settings.max_rows),
        "scaler": params.get("scaler", bundle.features.scaler),
        "categorical_weight": params.get("categorical_weight", bundle.features.categorical_weight),
        # the features the run chose to log (configured, skewed, or kept from its predecessor)
        "log_features": tuple(bundle.features.log_features),
        "log_skewness": None,
        # bundles from before clipping had none
        "clip_quantile": params.get("clip_quantile", 0.0),
        "clip_margin": params.get("clip_margin", settings.clip_margin),
        "features": tuple(bundle.features.numeric),
        "categorical": tuple(bundle.features.vocabulary),
        "silhouette_sample": params.get("silhouette_sample", settings.silhouette_sample),
        # bundles from before the vocabulary cap kept every value seen once
        "vocabulary_max": params.get("vocabulary_max", 1000),
        "vocabulary_min_count": params.get("vocabulary_min_count", 1),
        "random_state": bundle.lineage.random_state,
        "events_topic": bundle.lineage.topic,
    })
    window = read_window(fit_settings, now_ms=bundle.lineage.window_end_ms,
                         ranges=bundle.lineage.partitions)
    if window.rows_read != bundle.lineage.rows_read:
        return {"version": version, "reproduced": False,
                "rows_read": window.rows_read, "rows_recorded": bundle.lineage.rows_read,
                "detail": "the recorded offsets are no longer (all) retained by the topic"}
    _, x, fit, _ = fit_window(fit_settings, window)
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
