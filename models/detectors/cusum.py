"""Robust two-sided CUSUM: a River drift detector for heavy-tailed, skewed residuals.

Page's CUSUM accumulates evidence of a level change: with a residual ``r``
(an observation minus the current robust level, here a log price minus the
rolling median of log prices), clipped to ``[-clip, clip]`` so that one
rare, expensive item (a CryptoPunk alien sells at 100x the floor) moves the
sums by at most ``clip``::

    up   = max(0, up   + min(r, clip)  - k)
    down = max(0, down - max(r, -clip) - k)

and a drift is declared when either sum exceeds ``h``. ``k`` is the drift
per observation it ignores (half of the smallest shift worth finding, in log
units), ``h`` sets the false-alarm rate. ``run_up``/``run_down`` count the
observations since a sum last left zero, which dates the change.

It follows River's ``DriftDetector`` interface (``update``,
``drift_detected``; the detector resets itself on the update after a drift),
adds a pure :meth:`peek` (what ``update`` would do, without doing it) so a
scorer can score without copying, and keeps its state as a few numbers
(:meth:`to_json` / :meth:`from_json`), so checkpoints are JSON.

Examples
--------
>>> det = RobustCUSUM(k=0.2, h=3.0, clip=0.4)
>>> [det.update(r) or det.drift_detected for r in [0.05, -0.1, 0.0, 0.1]]
[False, False, False, False]
>>> n = 0
>>> while not det.drift_detected:
...     det.update(0.35); n += 1
>>> n, det.direction, round(det.up, 2), det.run_up
(21, 1, 3.15, 21)
>>> det.update(0.0)  # the update after a drift starts afresh
>>> det.drift_detected, det.up
(False, 0.0)
"""

from __future__ import annotations

from typing import Any

from river import base

__all__ = ["RobustCUSUM"]


class RobustCUSUM(base.DriftDetector):
    """Two-sided CUSUM on clipped residuals (see the module docstring).

    Parameters
    ----------
    k
        Allowance per observation, in the residual's units (log price).
    h
        Decision threshold on either cumulative sum.
    clip
        Residuals are clipped to ``[-clip, clip]`` before accumulation.
    """

    def __init__(self, k: float = 0.2, h: float = 3.0, clip: float = 0.4) -> None:
        super().__init__()
        if not (k >= 0 and h > 0 and clip > 0):
            raise ValueError("need k >= 0, h > 0 and clip > 0")
        self.k = k
        self.h = h
        self.clip = clip
        self._reset()

    def _reset(self) -> None:
        super()._reset()
        self.up = 0.0
        self.down = 0.0
        self.run_up = 0
        self.run_down = 0
        self.direction = 0

    def peek(self, x: float) -> tuple[float, float, int, int, int]:
        """``(up, down, run_up, run_down, direction)`` after ``update(x)``,
        without changing the detector; ``direction`` is +1 or -1 on a drift
        (up wins a tie), else 0."""
        if self._drift_detected:
            up = down = 0.0
            run_up = run_down = 0
        else:
            up, down, run_up, run_down = self.up, self.down, self.run_up, self.run_down
        r = min(self.clip, max(-self.clip, x))
        up = max(0.0, up + r - self.k)
        down = max(0.0, down - r - self.k)
        run_up = run_up + 1 if up > 0 else 0
        run_down = run_down + 1 if down > 0 else 0
        direction = 1 if up > self.h else (-1 if down > self.h else 0)
        return up, down, run_up, run_down, direction

    def update(self, x: float) -> None:  # type: ignore[override]
        up, down, run_up, run_down, direction = self.peek(x)
        self.up, self.down, self.run_up, self.run_down, self.direction = up, down, run_up, run_down, direction
        self._drift_detected = direction != 0

    def to_json(self) -> dict[str, Any]:
        return {"k": self.k, "h": self.h, "clip": self.clip, "up": self.up, "down": self.down,
                "run_up": self.run_up, "run_down": self.run_down, "direction": self.direction,
                "drift": self._drift_detected}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "RobustCUSUM":
        det = cls(k=doc["k"], h=doc["h"], clip=doc["clip"])
        det.up, det.down = float(doc["up"]), float(doc["down"])
        det.run_up, det.run_down = int(doc["run_up"]), int(doc["run_down"])
        det.direction = int(doc["direction"])
        det._drift_detected = bool(doc["drift"])
        return det

    @classmethod
    def _unit_test_params(cls):
        yield {"k": 0.2, "h": 3.0, "clip": 0.4}
