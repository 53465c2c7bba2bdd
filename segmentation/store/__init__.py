"""Redis, split by concern. Redis is a cache and a coordination point, never the record of truth
(the Kafka topics are):

* ``keys``: the one key schema (also used by the tests);
* ``client``: connecting (redis-py's retry, credentials), the start-up check, and the two error
  policies (ride out an outage; ``best_effort`` logs and counts any failure);
* ``models``: the model registry's cache (bundles, the current pointer, id counters);
* ``trainer_state``: the trainer's lease, the rollback pin, the run log;
* ``replicas``: each consumer replica's online state;
* ``customers``: the latest segment per customer (one Redis or a Redis Cluster).
"""

from segmentation.customer import CustomerAssignment
from segmentation.store.client import (
    OUTAGE,
    RedisRefused,
    best_effort,
    check_redis,
    connect,
    connect_customers,
)
from segmentation.store.customers import CustomerStore, PartialWrite
from segmentation.store.keys import Keys
from segmentation.store.models import ModelStore, PublishConflict
from segmentation.store.replicas import ReplicaStates
from segmentation.store.trainer_state import TrainerState

__all__ = [
    "OUTAGE", "CustomerAssignment", "CustomerStore", "Keys", "ModelStore",
    "PartialWrite", "PublishConflict", "RedisRefused", "ReplicaStates", "TrainerState",
    "best_effort", "check_redis", "connect", "connect_customers",
]
