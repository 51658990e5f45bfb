"""Errors of the replay package, under :class:`infra.errors.ArtwatchError`."""

from infra.errors import ArtwatchError

__all__ = ["ReplayError", "PublishError", "BrokerUnavailable"]


class ReplayError(ArtwatchError):
    """Base class of replay errors."""


class PublishError(ReplayError):
    """The broker did not acknowledge some records of a replay."""


class BrokerUnavailable(ReplayError):
    """No Kafka broker answered at the bootstrap address."""
