"""Root of artwatch's exceptions: every package's errors extend ArtwatchError."""

__all__ = ["ArtwatchError", "ConfigError", "StackError", "SinkBackpressure"]


class ArtwatchError(Exception):
    """Base class of every error artwatch raises on purpose."""


class ConfigError(ArtwatchError):
    """Settings or arguments that cannot work together."""


class StackError(ArtwatchError):
    """The embedded broker or database could not be started, reached or stopped."""


class SinkBackpressure(ArtwatchError):
    """The database cannot take writes now; retry after ``retry_after`` seconds.

    ``reason`` is the last transient failure's class (``infra.db.sink.classify``),
    e.g. ``connection`` or ``lock_timeout``.
    """

    def __init__(self, message: str, retry_after: float, reason: str = "connection") -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.reason = reason
