"""Sale and listing rates per collection: ``volume_spike`` on surges.

Events of a collection (state per ``collection|currency|real``, or
``|synthetic``) are counted per hour, sales and listings apart. For each
kind, the **rate** is the number of events in the trailing 24 hourly buckets
(the current hour included) and the **baseline** an exponentially weighted
mean of the hourly counts (half-life 14 days) fed with each hour once it has
left that 24 h window, so a surge does not raise its own baseline; empty
hours count as zeros (folded in closed form, so a collection idle for a year
costs nothing).

A ``volume_spike`` is raised on the event that takes the 24 h count to at
least ``multiple`` (5x) the baseline's 24 h expectation and at least
``min_events`` (25), once the collection has ``warmup_s`` (14 days) of
history. It is raised once per surge: the next needs the rate to fall below
``rearm`` (2x) the baseline first, and ``cooldown_s`` (14 days) to pass, so a
boom that keeps outgrowing its baseline for weeks is one alert, not one every
few days. Evidence: the count, the expected count, the ratio, the 24 h sales
volume and the window.

On the real CryptoPunks sales (2017-06 .. 2021-04) the defaults raise 18
spikes: 2017-12-04, 2018-01-15, 2018-04-04, 2018-05-07, 2018-06-08,
2019-05-06, 2019-05-23, 2019-06-20, 2019-09-02, 2019-11-23, 2020-01-04,
2020-05-10, 2020-05-27, 2020-09-11, 2020-09-25, 2020-12-22, 2021-01-27 and
2021-02-14 (the largest: 114 sales in 24 h against 23 expected).

Examples
--------
Five sales a day for a month, then 60 in one day:

>>> from datetime import datetime, timedelta, timezone
>>> from decimal import Decimal
>>> from types import SimpleNamespace as R
>>> t0 = datetime(2021, 1, 1, tzinfo=timezone.utc)
>>> times = [t0 + timedelta(hours=4.8 * i) for i in range(150)]
>>> times += [times[-1] + timedelta(minutes=20 * (i + 1)) for i in range(60)]
>>> sales = [R(kind="sales", event_id=f"s{i}", ts=t, collection="punks", currency="ETH", price=Decimal("1"),
...            synthetic=False) for i, t in enumerate(times)]
>>> from models.scorer import prequential
>>> spikes = [s for _, out in prequential(VolumeSpike(), sales) for s in out.signals]
>>> [(s.event_id, s.evidence["rate"], s.evidence["count_24h"], round(s.evidence["expected_24h"], 1)) for s in spikes]
[('s171', 'sales', 26, 5.0)]
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from decimal import Decimal, localcontext
from typing import Any, Optional

from models.detectors.common import epoch, iso, market_key, split_key
from models.scorer import CheckpointError, Scored, Signal, decode_checkpoint, encode_checkpoint

__all__ = ["VolumeSpike", "VolumeParams", "KIND"]

KIND = "volume_spike"
_DAY = 86400.0


@dataclass(frozen=True)
class VolumeParams:
    bucket_s: float = 3600.0
    buckets: int = 24
    half_life_s: float = 14 * _DAY
    multiple: float = 5.0
    min_events: int = 25
    warmup_s: float = 14 * _DAY
    rearm: float = 2.0
    cooldown_s: float = 14 * _DAY


@dataclass
class _Rate:
    """One kind's counter: hourly buckets of the window, the EW baseline, the arming flag."""

    buckets: list  # [hour, count, volume (str)], ascending hours, the last `buckets` hours at most
    mean: float  # EW mean of hourly counts folded so far, from 0 (bias-corrected when read)
    folded: Optional[int]  # last hour folded into `mean` (None: nothing yet)
    start: Optional[int]  # first hour folded
    armed: bool
    fired: Optional[float] = None  # time of the last spike

    def to_json(self) -> dict:
        return {"buckets": self.buckets, "mean": self.mean, "folded": self.folded, "start": self.start,
                "armed": self.armed, "fired": self.fired}

    @classmethod
    def from_json(cls, doc: dict) -> "_Rate":
        def hour(v: Any) -> Optional[int]:
            return None if v is None else int(v)
        return cls([[int(h), int(c), str(v)] for h, c, v in doc["buckets"]], float(doc["mean"]),
                   hour(doc["folded"]), hour(doc["start"]), bool(doc["armed"]),
                   None if doc["fired"] is None else float(doc["fired"]))


@dataclass
class _State:
    first: Optional[float]
    rates: dict  # kind -> _Rate


@dataclass(frozen=True)
class _Step:
    buckets: list
    mean: float
    folded: Optional[int]
    start: Optional[int]
    count: int
    volume: Decimal
    expected: float
    fire: bool
    armed: bool
    fired: Optional[float]


class VolumeSpike:
    """The ``volume_spike`` scorer (see the module docstring)."""

    name = "volume_spike"
    version = 1
    kinds = frozenset({"sales", "listings"})

    def __init__(self, params: VolumeParams = VolumeParams()) -> None:
        if params.multiple <= params.rearm or params.rearm <= 0:
            raise ValueError("need multiple > rearm > 0")
        self.params = params
        self._config = asdict(params)
        # weight of one new hourly count in the EW mean
        self._alpha = 1.0 - 0.5 ** (params.bucket_s / params.half_life_s)

    def key(self, record: Any) -> Optional[str]:
        return market_key(record)

    def new_state(self, key: str) -> _State:
        return _State(first=None, rates={})

    def _fold(self, mean: float, folded: Optional[int], hour: int, count: int) -> tuple[float, int]:
        a = self._alpha
        if folded is not None and hour > folded + 1:
            mean *= (1 - a) ** (hour - folded - 1)  # the empty hours in between
        return (1 - a) * mean + a * count, hour

    def _expected(self, mean: float, folded: Optional[int], start: Optional[int]) -> float:
        """Expected count in the window: the EW mean, corrected for having started at 0."""
        if folded is None or start is None:
            return 0.0
        weight = 1.0 - (1.0 - self._alpha) ** (folded - start + 1)
        return mean / weight * self.params.buckets

    def _step(self, state: _State, record: Any, t: float) -> _Step:
        p = self.params
        rate = state.rates.get(record.kind) or _Rate([], 0.0, None, None, True, None)
        hour = int(t // p.bucket_s)
        oldest = hour - p.buckets + 1  # first hour still in the window
        mean, folded, start = rate.mean, rate.folded, rate.start
        buckets = []
        for h, c, v in rate.buckets:
            if h < oldest:
                if start is None:
                    start = h
                mean, folded = self._fold(mean, folded, h, c)
            else:
                buckets.append([h, c, v])
        if folded is not None and folded < oldest - 1:
            mean, folded = mean * (1 - self._alpha) ** (oldest - 1 - folded), oldest - 1
        price = getattr(record, "price", None)
        add = str(price) if price is not None and record.kind == "sales" else "0"
        with localcontext() as ctx:
            ctx.prec = 100
            if buckets and buckets[-1][0] == hour:
                buckets[-1] = [hour, buckets[-1][1] + 1, str(Decimal(buckets[-1][2]) + Decimal(add))]
            elif buckets and buckets[-1][0] > hour:  # out of event-time order: count it in its hour
                for b in buckets:
                    if b[0] == hour:
                        b[1] += 1
                        b[2] = str(Decimal(b[2]) + Decimal(add))
                        break
                else:
                    buckets.append([hour, 1, add])
                    buckets.sort()
            else:
                buckets.append([hour, 1, add])
            count = sum(c for _, c, _ in buckets)
            volume = sum((Decimal(v) for _, _, v in buckets), Decimal(0))
        expected = self._expected(mean, folded, start)
        warm = state.first is not None and t - state.first >= p.warmup_s and folded is not None
        surge = warm and count >= p.min_events and count >= p.multiple * expected
        cooled = rate.fired is None or t - rate.fired >= p.cooldown_s
        fire = rate.armed and surge and cooled
        armed = (rate.armed and not fire) or (not rate.armed and count < p.rearm * expected)
        return _Step(buckets, mean, folded, start, count, volume, expected, fire, armed,
                     t if fire else rate.fired)

    def score(self, state: _State, record: Any) -> Scored:
        t = epoch(record.ts)
        step = self._step(state, record, t)
        if not step.fire:
            return Scored.EMPTY
        p = self.params
        collection, currency, synthetic = split_key(market_key(record) or "||real")
        start = step.buckets[0][0] * p.bucket_s
        evidence = {
            "detector": self.name, "version": self.version, "rate": record.kind,
            "count_24h": step.count, "expected_24h": step.expected,
            "ratio": step.count / step.expected if step.expected > 0 else math.inf,
            "threshold": {"multiple": p.multiple, "min_events": p.min_events},
            "baseline": f"EW mean of hourly counts, half-life {p.half_life_s / _DAY:g} days",
            "volume_24h": str(step.volume) if record.kind == "sales" else None, "currency": currency,
            "window": {"from": iso(start), "to": iso(t), "buckets": len(step.buckets), "bucket_s": p.bucket_s},
        }
        return Scored(signals=(Signal(kind=KIND, severity="info", subject=collection, ts=record.ts,
                                      evidence=evidence, detector=self.name, version=self.version,
                                      collection=collection, synthetic=synthetic,
                                      event_id=str(getattr(record, "event_id", ""))),))

    def learn(self, state: _State, record: Any) -> _State:
        t = epoch(record.ts)
        step = self._step(state, record, t)
        state.rates[record.kind] = _Rate(step.buckets, step.mean, step.folded, step.start, step.armed, step.fired)
        if state.first is None or t < state.first:
            state.first = t
        return state

    def dump(self, state: _State) -> bytes:
        return encode_checkpoint(self.name, self.version, {
            "config": self._config, "first": state.first,
            "rates": {k: r.to_json() for k, r in sorted(state.rates.items())}})

    def load(self, data: bytes) -> _State:
        doc = decode_checkpoint(data, self.name, self.version)
        if doc.get("config") != self._config:
            raise CheckpointError(f"checkpoint of {self.name!r} was written with other parameters "
                                  f"({doc.get('config')!r}); rebuild the state from history")
        return _State(first=doc["first"], rates={k: _Rate.from_json(r) for k, r in doc["rates"].items()})
