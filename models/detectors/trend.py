"""Trend breaks: a robust level model of a collection's prices with a drift detector on its residuals.

For every real sale of a collection (state per ``collection|currency|real``,
synthetic sales in their own state), the **level** is the rolling median of
the log prices of its last ``window`` sales (200), the same robust index
``price_index`` stores, seen from the trend's side. The sale's **residual**
is its log price minus that level, clipped to ``±clip`` (0.4, i.e. x0.67 to
x1.5) so that a rare item at 100x the floor counts like any sale above it. A
**drift detector** reads the residuals; when it fires, the detector raises a
``trend_break`` signal with the level before (the median it was comparing
against), the level after (median of the sales since the change began), the
detector that fired and its statistic, then starts a new level from the next
sales (it may fire again after ``rearm`` sales).

Default: the robust two-sided CUSUM of :mod:`models.detectors.cusum`
(k = 0.2, h = 3.0 in log units), chosen by ``models.detectors.evaluate`` on
the real CryptoPunks series. The alternatives that evaluation also measures
are configurations of this same class: River's ``PageHinkley``, ``ADWIN`` or
``KSWIN`` as the drift detector, and River's ``HoltWinters`` (level + slope,
fitted on the rolling median once its window is full and projected half a
window ahead, where the median lags) as the level model.

Examples
--------
A stable market, then the price level halves:

>>> from datetime import datetime, timedelta, timezone
>>> from decimal import Decimal
>>> from types import SimpleNamespace
>>> import random
>>> rng = random.Random(0)
>>> t0 = datetime(2021, 1, 1, tzinfo=timezone.utc)
>>> def sale(i, level):
...     price = Decimal(str(round(level * rng.lognormvariate(0, 0.25), 4)))
...     return SimpleNamespace(kind="sales", event_id=f"s{i}", ts=t0 + timedelta(hours=i),
...                            collection="punks", currency="ETH", price=price, synthetic=False)
>>> sales = [sale(i, 10.0) for i in range(400)] + [sale(i, 5.0) for i in range(400, 500)]
>>> from models.scorer import prequential
>>> signals = [s for _, out in prequential(TrendBreak(), sales) for s in out.signals]
>>> [(s.event_id, s.evidence["direction"], s.evidence["detector"]) for s in signals]
[('s414', 'down', 'robust_cusum')]
>>> round(signals[0].evidence["level_before"]), round(signals[0].evidence["level_after"])
(10, 5)
"""

from __future__ import annotations

import base64
import copy
import math
import pickle
from dataclasses import asdict, dataclass
from typing import Any, Optional

import river
from river import drift as river_drift
from river import time_series

from models.detectors.common import Window, epoch, iso, log_price, market_key, median, split_key
from models.detectors.cusum import RobustCUSUM
from models.scorer import CheckpointError, Scored, Signal, decode_checkpoint, encode_checkpoint

__all__ = ["TrendBreak", "TrendParams", "KIND", "DRIFTS", "LEVELS"]

KIND = "trend_break"
DRIFTS = ("cusum", "page_hinkley", "adwin", "kswin")
LEVELS = ("median", "holt_winters")

# Names of the drift detectors in evidence (what fired).
_DETECTOR_NAMES = {"cusum": "robust_cusum", "page_hinkley": "river.drift.PageHinkley",
                   "adwin": "river.drift.ADWIN", "kswin": "river.drift.KSWIN"}


@dataclass(frozen=True)
class TrendParams:
    """Parameters of the level and of the default CUSUM, log units.

    ``window``: sales in the rolling median level. ``rearm``: sales the level
    needs (at the start, and after each break) before a break can be raised.
    ``clip``: residual clip. ``k``, ``h``: CUSUM allowance and threshold.
    ``recent``: recent sales kept to measure the level after a break.
    """

    window: int = 200
    rearm: int = 15
    clip: float = 0.4
    k: float = 0.2
    h: float = 3.0
    recent: int = 50


@dataclass
class _State:
    level: Window
    recent: Window
    det: Any
    hw: Any = None
    n: int = 0
    alarms: int = 0


def _pickled(obj: Any) -> dict[str, str]:
    return {"pickle": base64.b64encode(pickle.dumps(obj, protocol=4)).decode()}


def _unpickled(doc: dict[str, str]) -> Any:
    # Only checkpoints this process family wrote (our own database) are ever
    # loaded, and only after their scorer name, version, parameters and River
    # version were checked.
    return pickle.loads(base64.b64decode(doc["pickle"]))


class TrendBreak:
    """The ``trend_break`` scorer (see the module docstring).

    Parameters
    ----------
    params
        Level and CUSUM parameters.
    drift
        ``"cusum"`` (default), or River's ``"page_hinkley"``, ``"adwin"``,
        ``"kswin"``, configured by ``drift_params`` (keyword arguments of the
        River class; residuals are clipped to ``±params.clip`` first).
    level
        ``"median"`` (default) or ``"holt_winters"`` (River's HoltWinters on
        the rolling median, ``level_params`` e.g. ``{"alpha": 0.1, "beta": 0.01}``).
    name
        The scorer's stable name; defaults to ``trend_break`` for the default
        configuration and ``trend_break[level+drift]`` otherwise.
    """

    version = 1
    kinds = frozenset({"sales"})

    def __init__(self, params: TrendParams = TrendParams(), *, drift: str = "cusum",
                 drift_params: Optional[dict] = None, level: str = "median",
                 level_params: Optional[dict] = None, name: Optional[str] = None) -> None:
        if drift not in DRIFTS:
            raise ValueError(f"drift must be one of {DRIFTS}, got {drift!r}")
        if level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
        self.params = params
        self.drift = drift
        self.drift_params = dict(drift_params or {})
        self.level_model = level
        self.level_params = dict(level_params or ({"alpha": 0.1, "beta": 0.01} if level == "holt_winters" else {}))
        default = drift == "cusum" and level == "median" and not self.drift_params
        self.name = name or (KIND if default else f"{KIND}[{level}+{drift}]")
        self.detector_name = _DETECTOR_NAMES[drift] if level == "median" else f"river.time_series.HoltWinters+{_DETECTOR_NAMES[drift]}"
        # The last River probe (see _peek): learn reuses it instead of
        # updating the detector a second time with the same residual. It holds
        # the detector it copied, so identity (`is`) cannot be a recycled id;
        # a probe of another state or residual is never used.
        self._probe: Optional[tuple[Any, float, Any]] = None
        self._config = {"params": asdict(params), "drift": drift, "drift_params": self.drift_params,
                        "level": level, "level_params": self.level_params}

    # -- the protocol -------------------------------------------------------

    def key(self, record: Any) -> Optional[str]:
        if log_price(getattr(record, "price", None)) is None:
            return None
        return market_key(record)

    def new_state(self, key: str) -> _State:
        p = self.params
        return _State(level=Window(p.window), recent=Window(p.recent), det=self._new_detector(),
                      hw=self._new_level_model())

    def score(self, state: _State, record: Any) -> Scored:
        x = log_price(record.price)
        if x is None or len(state.level) < self.params.rearm:
            return Scored.EMPTY
        level = self._level(state)
        r = x - level
        fired, stats = self._peek(state.det, r)
        if not fired:
            return Scored.EMPTY
        return Scored(signals=(self._signal(state, record, x, level, stats),))

    def learn(self, state: _State, record: Any) -> _State:
        x = log_price(record.price)
        if x is None:
            return state
        t = epoch(record.ts)
        state.n += 1
        fired = False
        if len(state.level) >= self.params.rearm:
            r = x - self._level(state)
            probe = self._probe
            self._probe = None
            if probe is not None and probe[0] is state.det and probe[1] == r:
                state.det = probe[2]  # score already updated a copy of this detector with r
            else:
                state.det.update(self._clip(r) if self.drift != "cusum" else r)
            fired = state.det.drift_detected
        state.recent.add(t, x)
        if fired:
            # A new regime: forget the old level, start a fresh detector.
            state.alarms += 1
            state.level.clear()
            state.det = self._new_detector()
            state.hw = self._new_level_model()
            return state
        state.level.add(t, x)
        if state.hw is not None and len(state.level) == self.params.window:
            # Fed only once the window is full: River's HoltWinters takes its
            # initial slope from its first two values, and the medians of a
            # filling window move too much for that.
            state.hw.learn_one(state.level.median())
        return state

    def dump(self, state: _State) -> bytes:
        doc: dict[str, Any] = {
            "config": self._config,
            "level": state.level.to_json(),
            "recent": state.recent.to_json(),
            "n": state.n,
            "alarms": state.alarms,
        }
        if isinstance(state.det, RobustCUSUM):
            doc["det"] = state.det.to_json()
        else:
            doc["det"] = _pickled(state.det)
        doc["hw"] = None if state.hw is None else _pickled(state.hw)
        if not isinstance(state.det, RobustCUSUM) or state.hw is not None:
            doc["river"] = river.__version__
        return encode_checkpoint(self.name, self.version, doc)

    def load(self, data: bytes) -> _State:
        doc = decode_checkpoint(data, self.name, self.version)
        if doc.get("config") != self._config:
            raise CheckpointError(f"checkpoint of {self.name!r} was written with other parameters "
                                  f"({doc.get('config')!r}); rebuild the state from history")
        if "river" in doc and doc["river"] != river.__version__:
            raise CheckpointError(f"checkpoint of {self.name!r} holds River {doc['river']} objects; "
                                  f"this process runs River {river.__version__}")
        p = self.params
        det = RobustCUSUM.from_json(doc["det"]) if "pickle" not in doc["det"] else _unpickled(doc["det"])
        return _State(level=Window.from_json(doc["level"], p.window),
                      recent=Window.from_json(doc["recent"], p.recent), det=det,
                      hw=None if doc["hw"] is None else _unpickled(doc["hw"]),
                      n=int(doc["n"]), alarms=int(doc["alarms"]))

    # -- internals ----------------------------------------------------------

    def _new_detector(self) -> Any:
        p = self.params
        if self.drift == "cusum":
            return RobustCUSUM(k=self.drift_params.get("k", p.k), h=self.drift_params.get("h", p.h),
                               clip=self.drift_params.get("clip", p.clip))
        if self.drift == "page_hinkley":
            return river_drift.PageHinkley(**self.drift_params)
        if self.drift == "adwin":
            return river_drift.ADWIN(**self.drift_params)
        return river_drift.KSWIN(**{"seed": 7, **self.drift_params})

    def _new_level_model(self) -> Any:
        if self.level_model == "holt_winters":
            return time_series.HoltWinters(**self.level_params)
        return None

    def _clip(self, r: float) -> float:
        c = self.params.clip
        return min(c, max(-c, r))

    def _level(self, state: _State) -> float:
        hw = state.hw
        if hw is not None and hw._initialized:
            return hw.forecast(horizon=max(1, len(state.level) // 2))[-1]
        return state.level.median()

    def _peek(self, det: Any, r: float) -> tuple[int, dict]:
        """(direction or 0, statistic) of updating ``det`` with residual ``r``, leaving ``det`` as it is."""
        if isinstance(det, RobustCUSUM):
            up, down, run_up, run_down, direction = det.peek(r)
            return direction, {"up": up, "down": down, "run": run_up if direction > 0 else run_down,
                               "k": det.k, "h": det.h, "clip": det.clip}
        probe = copy.deepcopy(det)
        probe.update(self._clip(r))
        self._probe = (det, r, probe)
        if not probe.drift_detected:
            return 0, {}
        return 2, {"params": {k: v for k, v in self.drift_params.items()}}  # direction decided from the data

    def _signal(self, state: _State, record: Any, x: float, level: float, stats: dict) -> Signal:
        recent = state.recent.items() + [(epoch(record.ts), x)]
        run = stats.pop("run", None) or min(25, len(recent))
        run = max(1, min(run, len(recent)))
        after = median(v for _, v in recent[-run:])
        if "up" in stats:
            direction = "up" if stats["up"] > stats["h"] else "down"
        else:
            direction = "up" if after >= level else "down"
        before_price, after_price = math.exp(level), math.exp(after)
        change = after_price / before_price - 1.0
        collection, currency, synthetic = split_key(market_key(record) or "||real")
        evidence = {
            "detector": "robust_cusum" if self.drift == "cusum" and self.level_model == "median" else self.detector_name,
            "scorer": self.name,
            "version": self.version,
            "direction": direction,
            "level_before": before_price,
            "level_after": after_price,
            "change": change,
            "currency": currency,
            "price": str(record.price),
            "statistic": stats,
            "window": {
                "level_sales": len(state.level),
                "level_from": iso(state.level.oldest_time()) if len(state.level) else None,
                "change_sales": run,
                "change_from": iso(recent[-run][0]),
                "to": iso(recent[-1][0]),
            },
        }
        severity = "critical" if abs(math.log1p(change)) >= math.log(2.0) else "warning"
        return Signal(kind=KIND, severity=severity, subject=collection, ts=record.ts, evidence=evidence,
                      detector=self.name, version=self.version, collection=collection,
                      synthetic=synthetic, event_id=str(getattr(record, "event_id", "")))
