"""Waiting things out: capped, jittered exponential backoff and a log throttle."""

from __future__ import annotations

import random
import time
from typing import Callable

__all__ = ["Backoff", "Throttle"]


class Backoff:
    """Delays that double from ``first`` up to ``cap``, each drawn uniformly from
    its upper half, so many waiters do not retry in step ("equal jitter").

    Examples
    --------
    >>> b = Backoff(0.1, 1.0)
    >>> d = [b.next() for _ in range(6)]
    >>> 0.05 <= d[0] <= 0.1 and all(0.5 <= x <= 1.0 for x in d[4:])
    True
    >>> b.reset(); b.next() <= 0.1
    True
    """

    def __init__(self, first: float, cap: float) -> None:
        if not 0 < first <= cap:
            raise ValueError(f"need 0 < first <= cap, got {first} and {cap}")
        self.first, self.cap = first, cap
        self._upper = first

    def next(self) -> float:
        upper = self._upper
        self._upper = min(upper * 2, self.cap)
        return random.uniform(upper / 2, upper)

    def reset(self) -> None:
        self._upper = self.first


class Throttle:
    """True at most once per ``every`` seconds: one log line per backoff step, at
    most every ~10 s, through an outage of any length.

    Examples
    --------
    >>> now = [0.0]
    >>> t = Throttle(10, clock=lambda: now[0])
    >>> t.ready(), t.ready()
    (True, False)
    >>> now[0] = 10.5; t.ready()
    True
    """

    def __init__(self, every: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.every = every
        self.clock = clock
        self._last = float("-inf")

    def ready(self) -> bool:
        now = self.clock()
        if now - self._last >= self.every:
            self._last = now
            return True
        return False

    def reset(self) -> None:
        self._last = float("-inf")
