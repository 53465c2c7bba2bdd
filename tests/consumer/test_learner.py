"""A batch in flight when a new model is swapped in: it was scored by the old model, so it is
counted against the old model's segment ids and left out of the new model's online learning
(before, a new model with fewer segments crashed the consumer here: a shares ValueError on the
next report, an IndexError counting the batch)."""

from __future__ import annotations

import numpy as np

from consumer.learner import Learner
from consumer.model import ActiveModel
from consumer.scoring import score_batch
from consumer.telemetry import Reporter
from segmentation.metrics import ConsumerMetrics
from segmentation.settings import Settings
from tests.support.messages import DEMO_MODEL as MODEL
from tests.support.messages import DEMO_RULES as RULES
from tests.support.messages import Msg, demo_values
from tests.support.stack import sample


def smaller(model: ActiveModel, k: int) -> ActiveModel:
    """The next version with only the first ``k`` segments."""
    b = model.bundle
    return ActiveModel.of(b.model_copy(update={
        "version": b.version + 1, "centroids": b.centroids[:k], "segment_ids": b.segment_ids[:k],
        "segment_names": b.segment_names[:k],
        "quality": b.quality.model_copy(update={"shares": [1 / k] * k, "sizes": [1] * k}),
    }))


def test_a_batch_scored_by_the_old_model_finishing_after_a_swap_to_fewer_segments() -> None:
    batch = score_batch([Msg(v, i) for i, v in enumerate(demo_values(500))], MODEL, RULES)
    assert int(batch.indices.max()) == MODEL.bundle.k - 1  # the old model's last segment is used
    new = smaller(MODEL, MODEL.bundle.k - 1)
    metrics = ConsumerMetrics()
    learner = Learner(Settings().half_life_events, Settings().random_state, metrics)
    learner.reset(new)  # swapped in while the batch was in flight
    assert learner.online is not None and learner.quality is not None
    before = learner.online.centroids.copy()

    learner.learn(batch, scored_by=MODEL)
    Reporter("r", None, None, metrics).count(batch, (), MODEL, 0.0)  # type: ignore[arg-type]

    assert np.array_equal(learner.online.centroids, before) and learner.online.events_seen == 0
    assert learner.quality.shares().shape == (new.bundle.k,)
    last = str(MODEL.bundle.segment_ids[-1])  # counted under the id that scored it
    assert sample(metrics, "segment_assignments_total", segment_id=last) == np.sum(
        batch.indices == MODEL.bundle.k - 1)


def test_a_batch_of_the_current_model_is_learned() -> None:
    batch = score_batch([Msg(v, i) for i, v in enumerate(demo_values(500))], MODEL, RULES)
    learner = Learner(Settings().half_life_events, Settings().random_state, ConsumerMetrics())
    learner.reset(MODEL)
    learner.learn(batch, scored_by=MODEL)
    assert learner.online is not None and learner.online.events_seen == batch.indices.shape[0]
