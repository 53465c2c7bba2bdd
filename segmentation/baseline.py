"""The accepted quality baseline: how well the last model the quality gate *accepted* separated
its own training window.

Every bundle carries it (``quality.gate``: ``baseline_silhouette``, ``baseline_davies_bouldin``,
``baseline_version``). A model that passes the gate becomes the baseline; a forced publish
(``trainer once --force``) carries the previous baseline on unchanged. So a publish alone never
moves the yardstick: the gate compares later refits with it, and the consumers measure their
silhouette drift against it. Were each model its own yardstick, a collapsed model, once live,
would read a drift of about 0 and the gate would compare the next collapse with the last one.

A schema-1 bundle gets its own figures by migration (``segmentation.bundle.migrate``) unless it was
forced; a forced one has none, and the trainer looks behind it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from segmentation.bundle import BASELINE_DAVIES_BOULDIN as DAVIES_BOULDIN
from segmentation.bundle import BASELINE_SILHOUETTE as SILHOUETTE
from segmentation.bundle import BASELINE_VERSION as VERSION
from segmentation.bundle import ModelBundle


@dataclass(frozen=True)
class QualityBaseline:
    """Training-window quality of the last accepted model, and which version that was."""

    silhouette: float
    davies_bouldin: float
    version: int | None = None

    def record(self) -> dict[str, float | str | bool]:
        """The entries of a bundle's ``quality.gate`` that carry this baseline.

        >>> QualityBaseline(0.7, 0.4, 3).record()
        {'baseline_silhouette': 0.7, 'baseline_davies_bouldin': 0.4, 'baseline_version': 3}
        """
        out: dict[str, float | str | bool] = {
            SILHOUETTE: self.silhouette, DAVIES_BOULDIN: self.davies_bouldin,
        }
        if self.version is not None:
            out[VERSION] = self.version
        return out


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def recorded_baseline(bundle: ModelBundle) -> QualityBaseline | None:
    """The baseline a bundle carries, or None (a bundle from before baselines, or a value out of
    range: a bundle is untrusted input).

    >>> from segmentation.bundle import Lineage, Quality
    >>> from segmentation.features import FeatureSpec
    >>> def bundle(gate):
    ...     return ModelBundle(version=2, features=FeatureSpec(numeric=["x"], center=[0.0], scale=[1.0]),
    ...         centroids=[[0.0], [1.0]], segment_ids=[0, 1], segment_names=["a", "b"],
    ...         quality=Quality(silhouette=0.3, davies_bouldin=1.2, inertia=1.0, shares=[0.5, 0.5],
    ...                         sizes=[1, 1], gate=gate), lineage=Lineage(topic="t"))
    >>> recorded_baseline(bundle({"baseline_silhouette": 0.75, "baseline_davies_bouldin": 0.35,
    ...                           "baseline_version": 1.0}))
    QualityBaseline(silhouette=0.75, davies_bouldin=0.35, version=1)
    >>> recorded_baseline(bundle({"baseline_silhouette": 7.0, "baseline_davies_bouldin": 0.35})) is None
    True
    >>> baseline_of(bundle({}))
    QualityBaseline(silhouette=0.3, davies_bouldin=1.2, version=2)
    """
    gate = bundle.quality.gate
    silhouette, davies_bouldin = _number(gate.get(SILHOUETTE)), _number(gate.get(DAVIES_BOULDIN))
    if silhouette is None or davies_bouldin is None:
        return None
    if not (-1.0 <= silhouette <= 1.0 and davies_bouldin >= 0.0):
        return None
    version = _number(gate.get(VERSION))
    return QualityBaseline(silhouette, davies_bouldin, int(version) if version is not None else None)


def own_baseline(bundle: ModelBundle) -> QualityBaseline:
    """A bundle's own training figures as a baseline (what accepting it records)."""
    return QualityBaseline(bundle.quality.silhouette, bundle.quality.davies_bouldin, bundle.version)


def baseline_of(bundle: ModelBundle) -> QualityBaseline:
    """The baseline a bundle carries; for a bundle from before baselines, its own figures."""
    return recorded_baseline(bundle) or own_baseline(bundle)
