"""Every Redis key and channel the service uses, in one place (``P`` is ``SEG_REDIS_PREFIX``)::

    P:bundle:<v>        JSON bundle, written once (SET NX), never changed
    P:current           the current version number (switched only by the publish script)
    P:versions          sorted set of published versions
    P:version_seq       INCR counter: versions strictly rise, even across rollbacks
    P:segment_id_seq    INCR counter: segment ids are never reused
    P:registry_offset   the models topic's end offset this cache last caught up with
    P:challenger        JSON bundle of the challenger, scored in the shadow of the current model
                        (set by `trainer once --challenger`, cleared by `promote` and `discard`)
    P:lock              trainer lease (SET NX PX, released only by its owner)
    P:pinned            set by a rollback: scheduled retrains wait until `trainer unpin`
    P:runs              list: the trainer's recent runs (JSON), newest first, bounded
    P:online:<replica>  JSON: a consumer replica's online centroids and quality figures (TTL)
    P:customer:<id>     hash: latest segment of a customer (TTL)
    P:models            pub/sub channel: a published version number, or `challenger` when the
                        challenger slot changed (any message means: read the pointers again)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    """The key schema under one prefix.

    >>> keys = Keys("seg")
    >>> keys.bundle(3), keys.current, keys.customer("c-1"), keys.online("*")
    ('seg:bundle:3', 'seg:current', 'seg:customer:c-1', 'seg:online:*')
    >>> keys.challenger
    'seg:challenger'
    """

    prefix: str

    def _key(self, *parts: object) -> str:
        return ":".join([self.prefix, *map(str, parts)])

    def bundle(self, version: int | str) -> str:
        return self._key("bundle", version)

    def customer(self, customer_id: str) -> str:
        return self._key("customer", customer_id)

    def online(self, replica: str) -> str:
        return self._key("online", replica)

    @property
    def current(self) -> str:
        return self._key("current")

    @property
    def challenger(self) -> str:
        return self._key("challenger")

    @property
    def versions(self) -> str:
        return self._key("versions")

    @property
    def version_seq(self) -> str:
        return self._key("version_seq")

    @property
    def segment_id_seq(self) -> str:
        return self._key("segment_id_seq")

    @property
    def registry_offset(self) -> str:
        return self._key("registry_offset")

    @property
    def lock(self) -> str:
        return self._key("lock")

    @property
    def pinned(self) -> str:
        return self._key("pinned")

    @property
    def runs(self) -> str:
        return self._key("runs")

    @property
    def models_channel(self) -> str:
        return self._key("models")

    @property
    def everything(self) -> str:
        """A SCAN pattern matching every key under the prefix."""
        return self._key("*")
