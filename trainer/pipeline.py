"""One training run along the data flow: window -> fit -> gate -> match -> publish (or store as
the challenger)."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import version as package_version

import numpy as np

from segmentation.baseline import QualityBaseline, own_baseline, recorded_baseline
from segmentation.bundle import BundleError, Lineage, ModelBundle
from segmentation.domain import GATE_CHECKS, RunOutcome
from segmentation.events import Event, raw_numeric
from segmentation.features import FeatureConfig, FeatureSpec, fit_spec
from segmentation.metrics import TrainerMetrics
from segmentation.store import ModelStore, PublishConflict, TrainerState
from trainer.challenger import clear_stale_challenger, store_challenger
from trainer.fit import K_SELECTION, Fit, KConfig, fit_model
from trainer.gate import GateFailure, GateLimits, check_finite_window
from trainer.models_topic import ModelTopic
from trainer.refit import Matching, assess, build_bundle, label, previous_rows
from trainer.segment_ids import load_names
from trainer.window import Window, WindowConfig, read_window

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MatchConfig:
    """How segment ids are matched (``Matching``), the names read from ``names_file`` at every
    run."""

    threshold: float
    max_spread: float
    names_file: str | None = None

    def matching(self) -> Matching:
        return Matching(self.threshold, self.max_spread, load_names(self.names_file))


@dataclass(frozen=True)
class TrainConfig:
    """What a training run depends on: the window it reads, the preprocessing, K, the gate and
    the matching; at least ``min_rows`` customers; the trainer lease of ``lock_ttl_s``; the
    models topic it publishes to."""

    window: WindowConfig
    features: FeatureConfig
    k: KConfig
    gate: GateLimits
    matching: MatchConfig
    min_rows: int
    lock_ttl_s: int
    models: ModelTopic


@dataclass
class RunResult:
    result: RunOutcome
    detail: str = ""
    version: int | None = None
    failures: list[GateFailure] = field(default_factory=list)
    bundle: ModelBundle | None = None
    forced: bool = False


def data_hash(x: np.ndarray) -> str:
    """SHA-256 of the training matrix (float64, C order): same rows, same hash.

    >>> data_hash(np.zeros((2, 2)))[:12]
    '66687aadf862'
    """
    return hashlib.sha256(np.ascontiguousarray(x, dtype=np.float64).tobytes()).hexdigest()


def library_versions() -> dict[str, str]:
    return {p: package_version(p) for p in ("scikit-learn", "numpy", "scipy")}


def fit_params(config: TrainConfig, k: int) -> dict[str, object]:
    """The parameters a fit depends on, recorded so that `reproduce` can repeat it."""
    features, k_config, window = config.features, config.k, config.window
    return {
        "k": k, "n_init": k_config.n_init, "max_rows": window.max_rows,
        "scaler": features.scaler, "log_features": list(features.log_features),
        "log_skewness": features.log_skewness, "clip_quantile": features.clip_quantile,
        "clip_margin": features.clip_margin,
        "feature_kinds": {n: k for n, k in features.kinds.items() if n in features.numeric},
        "categorical_weight": features.categorical_weight,
        "features": list(features.numeric), "categorical": list(features.categorical),
        "silhouette_sample": k_config.silhouette_sample, "stability_sample": k_config.stability_sample,
        "window_s": window.window_s,
        "vocabulary_max": features.vocabulary_max,
        "vocabulary_min_count": features.vocabulary_min_count,
    }


def encode_window(
    features: FeatureConfig, window: Window, current: ModelBundle | None = None
) -> tuple[FeatureSpec, np.ndarray]:
    """Fit the vocabulary and the preprocessing on a window and encode it with them; features
    the ``current`` model logs keep their log unless clearly no longer skewed."""
    spec = fit_spec(window.events, features,
                    current.features.log_features if current is not None else ())
    x, _ = spec.encode(window.events)
    return spec, x


def fit_window(
    features: FeatureConfig, k_config: KConfig, window: Window
) -> tuple[FeatureSpec, np.ndarray, Fit, list[Fit]]:
    """Fit scaler + vocabulary and K-Means on a window (also used by `reproduce`)."""
    spec, x = encode_window(features, window)
    fit, fits = fit_encoded(k_config, x)
    return spec, x, fit, fits


def fit_encoded(k_config: KConfig, x: np.ndarray, current_k: int | None = None,
                current_labels: np.ndarray | None = None) -> tuple[Fit, list[Fit]]:
    """K-Means on an encoded window (the rows inside the training envelope): K fixed, or chosen
    over ``k_min..k_max``, one segment when none is stable; ``current_k`` (the published model's)
    is kept while still plausible and stable, or while its refit partitions the rows as the
    current model does (``current_labels``, ``trainer.fit.choose_k``)."""
    return fit_model(x, k_config, current_k, current_labels)


def inside_envelope(
    spec: FeatureSpec, events: Sequence[Event], x: np.ndarray
) -> tuple[list[Event], np.ndarray]:
    """The window without its rows outside the training envelope: absurd rows never form a
    segment, stretch a centroid or count in the quality figures."""
    outside = spec.outside_envelope(raw_numeric(events, spec.numeric))
    return [e for e, out in zip(events, outside, strict=True) if not out], x[~outside]


def previous_encoding(current: ModelBundle | None, events: Sequence[Event]) -> np.ndarray | None:
    """The window encoded by the current model's own spec, as the consumers score it; None when
    there is no current model or its features are not in the events."""
    if current is None:
        return None
    try:
        x_current, _ = current.features.encode(events)
    except KeyError:
        log.warning("the current model cannot score the window (features missing): ids are "
                    "matched on centroids")
        return None
    return x_current


# How far back `accepted_baseline` looks for an accepted model behind forced schema-1 bundles,
# the only ones without a recorded baseline (``segmentation.bundle.migrate``).
BASELINE_LOOKBACK = 50


def accepted_baseline(store: ModelStore, current: ModelBundle | None) -> QualityBaseline | None:
    """The training quality of the last model the gate accepted, which refits are judged
    against (``segmentation.baseline``): the one the current bundle carries (every bundle since
    schema 2, and schema-1 bundles migrated, except forced ones); behind a forced schema-1 bundle,
    that of the last version before it that was not forced. None when no accepted model is known
    (then only the floors apply)."""
    bundle, seen = current, 0
    while bundle is not None and seen < BASELINE_LOOKBACK:
        recorded = recorded_baseline(bundle)
        if recorded is not None:
            return recorded
        if not bundle.forced:
            return own_baseline(bundle)
        seen += 1
        if bundle.previous_version is None:
            return None
        try:
            bundle = store.load(bundle.previous_version)
        except BundleError:
            return None
    return None


def report_model_quality(metrics: TrainerMetrics, model: ModelBundle | None,
                         baseline: QualityBaseline | None) -> None:
    """The current model's training silhouette next to the accepted baseline: a forced publish
    of a worse model shows (and alerts) as the gap between the two."""
    if model is None:
        return
    metrics.published_silhouette.set(model.quality.silhouette)
    metrics.baseline_silhouette.set((baseline or own_baseline(model)).silhouette)


def report_publish(metrics: TrainerMetrics, bundle: ModelBundle,
                   baseline: QualityBaseline | None) -> None:
    """A new current model: its segment-id mapping, when, and its quality against the baseline."""
    metrics.label_changes.labels("matched").inc(len(bundle.label_mapping.matched))
    metrics.label_changes.labels("new").inc(len(bundle.label_mapping.new))
    metrics.label_changes.labels("retired").inc(len(bundle.label_mapping.retired))
    metrics.last_publish.set(time.time())
    report_model_quality(metrics, bundle, baseline)


def report_gate(metrics: TrainerMetrics, failures: list[GateFailure]) -> None:
    """Which checks the last gated refit failed (1) or passed (0): a state an alert can hold
    on, where a refusal counted before the first scrape after a restart would be missed."""
    failed = {f.check for f in failures}
    for check in GATE_CHECKS:
        metrics.gate_failing.labels(check).set(1 if check in failed else 0)


def load_base(store: ModelStore) -> tuple[int | None, ModelBundle | None]:
    """The version a run starts from. A current bundle that fails validation is reported and
    treated as absent for matching, but stays the compare-and-set base."""
    base = store.current_version()
    if base is None:
        return None, None
    try:
        return base, store.load(base)
    except BundleError as exc:
        log.error("current bundle invalid; fitting without it", extra={"error": str(exc)})
        return base, None


def train_once(
    config: TrainConfig,
    store: ModelStore,
    metrics: TrainerMetrics,
    force: bool = False,
    now_ms: int | None = None,
    accept: bool = False,
    challenger: bool = False,
) -> RunResult:
    """One run. ``force`` publishes a model the gate refuses, keeping the accepted baseline;
    ``accept`` (implies ``force``) also makes it the baseline: the operator's word that the
    customer base itself changed and this quality is the new normal. ``challenger`` stores the
    model as the challenger instead of making it current (the first model is made current: there
    is nothing to challenge)."""
    started = time.monotonic()
    with TrainerState.of(store, metrics.redis_errors).lease(config.lock_ttl_s) as held:
        if not held:
            return _finish(metrics, store, RunResult(
                "skipped", "the trainer lock is held by another trainer (or Redis could not give it)"))
        try:
            config.models.sync(store)  # versions and ids continue from the topic, whatever Redis lost
            result = _train(config, store, metrics, force or accept, now_ms, accept, challenger)
        except PublishConflict as exc:
            result = RunResult("skipped", f"publish lost the race: {exc}")
        except Exception as exc:  # a failed run must not kill the periodic trainer
            log.exception("training run failed")
            result = RunResult("failed", f"{type(exc).__name__}: {exc}")
    metrics.duration.observe(time.monotonic() - started)
    return _finish(metrics, store, result)


def _train(
    config: TrainConfig, store: ModelStore, metrics: TrainerMetrics, force: bool, now_ms: int | None,
    accept: bool = False, challenger: bool = False,
) -> RunResult:
    base, current = load_base(store)
    baseline = accepted_baseline(store, current)
    report_model_quality(metrics, current, baseline)
    window = read_window(config.window, now_ms)
    metrics.rows.labels("read").set(window.rows_read)
    metrics.rows.labels("invalid").set(window.rows_invalid)
    metrics.rows.labels("used").set(len(window.events))
    needed = max(config.min_rows, (config.k.k or config.k.k_max) + 1)
    if len(window.events) < needed:
        return RunResult("skipped", f"{len(window.events)} customers in window, need {needed}")

    spec, x = encode_window(config.features, window, current)
    not_finite = check_finite_window(x, spec.center, spec.scale)
    if not_finite is not None:
        # Nothing can be fitted on NaN, and the bundle format refuses non-finite numbers, so
        # not even --force publishes this.
        report_gate(metrics, [not_finite])
        return _refuse(metrics, [not_finite], force)
    events, x = inside_envelope(spec, window.events, x)
    metrics.rows.labels("outside_envelope").set(len(window.events) - len(events))
    x_previous = previous_encoding(current, events)
    fit, fits = fit_encoded(config.k, x, current.k if current is not None else None,
                            previous_rows(current, x_previous)[0])
    metrics.silhouette.set(fit.silhouette)
    metrics.davies_bouldin.set(fit.davies_bouldin)
    metrics.k.set(fit.k)
    refit = assess(
        spec, x, fit, fits, current, x_previous, baseline,
        config.gate, config.matching.matching(), silhouette_sample=config.k.silhouette_sample,
        random_state=config.k.random_state,
        k_config=config.k, force=force,
    )
    if refit.no_structure:
        report_gate(metrics, [])
        return RunResult("no_structure", "no segment structure in the window: K=1 is the best "
                         "description of these customers; the current model stays")
    failures = refit.failures
    report_gate(metrics, failures)
    if failures and (not force or any(f.check == "finite" for f in failures)):
        return _refuse(metrics, failures, force)
    for failure in failures:
        # not a refusal: counted nowhere but the bundle (forced) and the run log
        log.warning("quality gate overridden by --force", extra={"failure": failure.detail})
    if refit.fallback_from is not None:
        log.warning("published at another K than chosen" if current is None else
                    "refit refused; the current structure is published instead (--accept publishes "
                    "the refit)", extra={"k": refit.fit.k, "chosen_k": refit.fallback_from,
                                         "continued": refit.continued})

    labelled = label(refit, current, store.allocate_segment_ids, config.matching.matching())
    version = store.allocate_version()
    fit = refit.fit
    bundle = build_bundle(
        refit, version, labelled, base, baseline,
        Lineage(
            topic=config.window.topic, partitions=window.ranges,
            window_start_ms=window.start_ms, window_end_ms=window.end_ms,
            rows_read=window.rows_read, rows_invalid=window.rows_invalid,
            rows_used=len(events), data_sha256=data_hash(x),
            random_state=config.k.random_state, libraries=library_versions(),
            params={**fit_params(config, fit.k), "sample": window.sample_record()},
        ),
        "fixed" if config.k.k is not None else K_SELECTION, operator_accepted=accept,
    )
    accepted = recorded_baseline(bundle)
    detail = "forced past the gate: " + "; ".join(f.detail for f in failures) if failures else ""
    if refit.refused:
        detail = (f"K={refit.fallback_from} was refused (" + "; ".join(f.detail for f in refit.refused)
                  + f"); K={fit.k} keeping the current structure was published instead")
    if challenger and base is not None:
        # matched, gated and numbered like a publish, but the current model stays
        store_challenger(config.models, store, bundle, metrics)
        return RunResult("challenger", detail, version=bundle.version, bundle=bundle,
                         failures=failures, forced=bundle.forced)
    if challenger:
        log.info("no current model to challenge: the first model is published as current")
    publish(config.models, store, bundle, base, metrics)
    report_publish(metrics, bundle, accepted)
    log.info("model published", extra={"version": bundle.version, "k": fit.k,
                                       "silhouette": round(fit.silhouette, 4), "forced": bundle.forced})
    return RunResult("published", detail, version=bundle.version, bundle=bundle,
                     failures=failures, forced=bundle.forced)


def _refuse(metrics: TrainerMetrics, failures: list[GateFailure], force: bool) -> RunResult:
    """The current model stays; why is logged, counted per check and recorded with the run."""
    for failure in failures:
        metrics.gate_refusals.labels(failure.check).inc()
    detail = "; ".join(f.detail for f in failures)
    if force:
        detail += " (a non-finite model cannot be forced)"
    log.warning("model refused by the quality gate", extra={"failures": detail})
    return RunResult("rejected", detail, failures=failures)


def publish(models: ModelTopic, store: ModelStore, bundle: ModelBundle, base: int | None,
            metrics: TrainerMetrics | None = None) -> None:
    """The models topic first (the record of truth: the bundle, then the pointer, acknowledged
    by every replica), then the Redis pointer (compare-and-set on ``base``). If the topic write
    fails nothing is switched; if another trainer won the Redis race, the bundle is withdrawn
    from the topic and its pointer set back to the winner, so that a cache rebuilt from the topic
    agrees with Redis. A challenger trained against another model than ``bundle`` is stale once
    ``bundle`` is current, and cleared."""
    writer = models.log()
    end = writer.publish(bundle)
    try:
        store.publish(bundle, base)
    except PublishConflict:
        writer.withdraw(bundle.version, store.current_version())
        raise
    store.set_registry_offset(end)
    clear_stale_challenger(models, store, bundle.version, metrics)


def _finish(metrics: TrainerMetrics, store: ModelStore, result: RunResult) -> RunResult:
    metrics.runs.labels(result.result).inc()
    TrainerState.of(store, metrics.redis_errors).record_run({
        "at": time.time(), "result": result.result, "detail": result.detail,
        "version": result.version, "forced": result.forced,
        "failures": [f.__dict__ for f in result.failures],
    })
    if result.result != "published":
        log.info("training run ended", extra={"result": result.result, "detail": result.detail})
    return result
