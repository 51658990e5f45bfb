"""The baseline trend-break rule: a fixed threshold on rolling medians.

For every sale, the median log price of the last ``recent`` sales (25) is
compared with the median of the ``reference`` sales before them (200); when
they differ by more than ``threshold`` (log units: 0.5 is x1.65 or x0.61) a
``trend_break`` is raised and the reference restarts from the recent sales.

It is what the evaluation (``models.detectors.evaluate``) measures the real
detectors against, tuned to the same false-alarm budget; it is not wired as a
live detector.

Examples
--------
>>> from datetime import datetime, timedelta, timezone
>>> from decimal import Decimal
>>> from types import SimpleNamespace
>>> t0 = datetime(2021, 1, 1, tzinfo=timezone.utc)
>>> prices = [10, 11, 9, 10.5, 9.5] * 50 + [20, 22, 18, 21, 19] * 10
>>> sales = [SimpleNamespace(kind="sales", event_id=f"s{i}", ts=t0 + timedelta(hours=i), collection="punks",
...                          currency="ETH", price=Decimal(str(p)), synthetic=False) for i, p in enumerate(prices)]
>>> from models.scorer import prequential
>>> [(s.event_id, round(s.evidence["change"], 2)) for _, out in prequential(MedianThreshold(), sales)
...  for s in out.signals]
[('s262', 0.8)]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from models.detectors.common import Window, epoch, iso, log_price, market_key, split_key
from models.scorer import CheckpointError, Scored, Signal, decode_checkpoint, encode_checkpoint

__all__ = ["MedianThreshold"]

KIND = "trend_break"


@dataclass
class _State:
    recent: Window
    reference: Window


class MedianThreshold:
    """Baseline ``trend_break`` rule (see the module docstring)."""

    name = "trend_break_baseline"
    version = 1
    kinds = frozenset({"sales"})

    def __init__(self, recent: int = 25, reference: int = 200, threshold: float = 0.5) -> None:
        if recent < 1 or reference < 1 or not threshold > 0:
            raise ValueError("need recent >= 1, reference >= 1 and threshold > 0")
        self.recent = recent
        self.reference = reference
        self.threshold = threshold
        self._config = {"recent": recent, "reference": reference, "threshold": threshold}

    def key(self, record: Any) -> Optional[str]:
        if log_price(getattr(record, "price", None)) is None:
            return None
        return market_key(record)

    def new_state(self, key: str) -> _State:
        return _State(recent=Window(self.recent), reference=Window(self.reference))

    def _medians(self, state: _State, t: float, x: float) -> Optional[tuple[float, float, float, float]]:
        """(recent median, reference median, reference start, recent start) with ``x`` in, or None
        while either window is not full. Pure: the windows are not changed."""
        R, M = self.recent, self.reference
        full = len(state.recent) == R
        if not full and len(state.recent) + 1 < R:
            return None
        moved = state.recent.item(0) if full else None  # leaves recent for the reference
        if len(state.reference) + (moved is not None) < M:
            return None
        rec = state.recent.sorted_with(add=x, drop=moved[1] if moved else None)
        evicted = state.reference.item(0) if moved is not None and len(state.reference) == M else None
        ref = state.reference.sorted_with(add=moved[1] if moved else None, drop=evicted[1] if evicted else None)
        ref_from = state.reference.item(1 if evicted else 0)[0] if len(state.reference) > (1 if evicted else 0) \
            else moved[0]  # type: ignore[index]
        rec_from = state.recent.item(1 if full else 0)[0] if len(state.recent) > (1 if full else 0) else t

        def mid(s: list[float]) -> float:
            n = len(s)
            return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])

        return mid(rec), mid(ref), ref_from, rec_from

    def score(self, state: _State, record: Any) -> Scored:
        x = log_price(record.price)
        if x is None:
            return Scored.EMPTY
        t = epoch(record.ts)
        m = self._medians(state, t, x)
        if m is None:
            return Scored.EMPTY
        rec, ref, ref_from, rec_from = m
        if abs(rec - ref) <= self.threshold:
            return Scored.EMPTY
        collection, currency, synthetic = split_key(market_key(record) or "||real")
        before, after = math.exp(ref), math.exp(rec)
        evidence = {
            "detector": "median_threshold", "scorer": self.name, "version": self.version,
            "direction": "up" if rec > ref else "down",
            "level_before": before, "level_after": after, "change": after / before - 1.0,
            "currency": currency, "price": str(record.price),
            "statistic": {"log_ratio": rec - ref, "threshold": self.threshold},
            "window": {"reference_sales": self.reference, "reference_from": iso(ref_from),
                       "recent_sales": self.recent, "recent_from": iso(rec_from), "to": iso(t)},
        }
        return Scored(signals=(Signal(kind=KIND, severity="warning", subject=collection, ts=record.ts,
                                      evidence=evidence, detector=self.name, version=self.version,
                                      collection=collection, synthetic=synthetic,
                                      event_id=str(getattr(record, "event_id", ""))),))

    def learn(self, state: _State, record: Any) -> _State:
        x = log_price(record.price)
        if x is None:
            return state
        t = epoch(record.ts)
        m = self._medians(state, t, x)
        fired = m is not None and abs(m[0] - m[1]) > self.threshold
        if len(state.recent) == self.recent:
            t0, v0 = state.recent.item(0)
            state.reference.add(t0, v0)
        state.recent.add(t, x)
        if fired:
            state.reference.clear()
        return state

    def dump(self, state: _State) -> bytes:
        return encode_checkpoint(self.name, self.version, {
            "config": self._config, "recent": state.recent.to_json(), "reference": state.reference.to_json()})

    def load(self, data: bytes) -> _State:
        doc = decode_checkpoint(data, self.name, self.version)
        if doc.get("config") != self._config:
            raise CheckpointError(f"checkpoint of {self.name!r} was written with other parameters "
                                  f"({doc.get('config')!r}); rebuild the state from history")
        return _State(recent=Window.from_json(doc["recent"], self.recent),
                      reference=Window.from_json(doc["reference"], self.reference))
