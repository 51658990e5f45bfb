"""Evaluation of the trend-break detectors on the real CryptoPunks price series (issue 9, point 7).

The series is every priced CryptoPunks sale, 2017-06 to 2021-04, in time
order (10,224 sales). Each detector runs through the protocol
(``score`` then ``learn``, state per key, checkpoints via ``dump``/``load``),
exactly as the stream stage would run it:

* **original series**: every alarm counts in ``false_alarms_per_10k`` (per
  10,000 sales). An alarm at sale ``i`` is **spurious** when the median price
  of the 200 sales after it differs from that of the 200 sales before it by
  less than 30% (``|after / before - 1| < 0.3``: not a real market move);
  an alarm with fewer than 50 sales on either side cannot be judged and counts
  as spurious.
* **injected level shifts**: at each of ``count`` injection points
  (``random.Random(seed).sample`` of the positions 300 .. n-300), for each
  factor in 0.5, 0.7, 1.3, 1.5, 2.0, a copy of the series has the prices of
  the 300 sales from that point multiplied by the factor. The detector's state
  just before the point is the one from the original run (its checkpoint is
  loaded), so each injection is evaluated on its own copy. A shift is
  detected when the detector alarms within those 300 sales; the delay is the
  number of shifted sales seen up to and including the alarm.
  ``drift_detected_share`` is the share detected over all factors and
  points, ``drift_delay_median`` the median delay of the detected ones.
  ``chance_share`` (extra) is the share of the same windows in which the
  original series already had an alarm: the part of the detection a detector
  gets from alarming at real market moves.

**Tuning.** Each detector has a small grid of its sensitivity settings. The
setting is chosen on the injection points of ``seed_tune`` (and the original
series): the highest detection share among the settings that keep within the
issue's budget (at most 20 false alarms per 10k, of which at most 3
spurious), ties to the shorter delay; a detector with no setting in budget
keeps its most conservative one (``budget_met: false``). The ``baseline``
(fixed threshold on rolling medians, :mod:`models.detectors.median_threshold`)
is tuned to the default detector's false-alarm rate: its most sensitive
threshold with no more false alarms than the default. All figures reported
are then measured on the injection points of ``seed_report``, which tuning
never sees.

The trend model's other defaults (:class:`models.detectors.trend.TrendParams`:
window 200, clip 0.4, k 0.2, rearm 15) were chosen the same way, on seed 1
only, by a wider grid (window 150/200/300, clip 0.3-0.6, k 0.15-0.25, h 2-4,
asymmetric up/down settings); the ``h`` tuned here on seed 1 is the shipped
3.0. The shipped seeds are ``seed_tune=1`` and ``seed_report=5``; seed 5 was
never looked at while choosing anything.

Examples
--------
A small subset of the series (the unit tests do the same; the command runs
the full series in well under a minute):

>>> from pathlib import Path
>>> csv_path = Path(__file__).resolve().parents[2] / "streams/replay/data/cryptopunks_sales.csv"
>>> out = evaluate(csv_path, seed_tune=1, seed_report=5, limit=1500, count=4, detectors=("robust_cusum", "baseline"))
>>> sorted(out)[:6]
['by_factor', 'default', 'detectors', 'drift_delay_median', 'drift_detected_share', 'evaluation']
>>> out["default"], sorted(out["detectors"])
('robust_cusum', ['baseline', 'robust_cusum'])
>>> 0 <= out["drift_detected_share"] <= 1
True
"""

from __future__ import annotations

import csv
import math
import random
import statistics
import time
from dataclasses import dataclass, replace
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Optional, Sequence

from models.detectors.median_threshold import MedianThreshold
from models.detectors.trend import TrendBreak, TrendParams
from models.scorer import Scorer

__all__ = ["evaluate", "load_sales", "injection_points", "DETECTORS", "FAST", "FACTORS", "TARGETS"]

FACTORS = (0.5, 0.7, 1.3, 1.5, 2.0)
SHIFT_SALES = 300
WARMUP_SALES = 300
SPURIOUS_HALF = 200
SPURIOUS_MIN_SIDE = 50
SPURIOUS_MOVE = 0.30
INJECTIONS_PER_FACTOR = 100
BUDGET_FALSE = 20.0
BUDGET_SPURIOUS = 3.0
DEFAULT = "robust_cusum"
TARGETS = {
    "drift_detected_share": 0.85,
    "drift_detected_share_0.5_and_2.0": 0.95,
    "drift_delay_median": 25.0,
    "false_alarms_per_10k": 20.0,
    "spurious_alarms_per_10k": 3.0,
}


@dataclass(frozen=True)
class Sale:
    """The fields of a sale the detectors read (the stream passes its ``Sale`` records)."""

    kind: ClassVar[str] = "sales"
    event_id: str
    ts: datetime
    collection: str
    item_id: str
    price: Decimal
    currency: str = "ETH"
    synthetic: bool = False


def _eth(wei: str) -> Decimal:
    """``wei / 10**18`` exactly, in the project's money form (``0.01``, ``4200``)."""
    value = Decimal(wei).scaleb(-18).normalize()
    return value.quantize(Decimal(1)) if value.as_tuple().exponent > 0 else value  # type: ignore[operator]


def load_sales(path: Path, limit: Optional[int] = None) -> list[Sale]:
    """The priced sales of the CryptoPunks CSV (``timestamp_utc``, ``punk_id``,
    ``price_wei``, ``tx`` ...), oldest first; rows without a price are skipped.
    Prices are exact (``price_wei / 10**18``)."""
    sales: list[Sale] = []
    with Path(path).open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            wei = (row.get("price_wei") or "").strip()
            if not wei.isdigit():
                continue
            sales.append(Sale(event_id="punks-sale-" + row["tx"],
                              ts=datetime.fromisoformat(row["timestamp_utc"].replace("Z", "+00:00")),
                              collection="cryptopunks", item_id=str(int(row["punk_id"])),
                              price=_eth(wei)))
    sales.sort(key=lambda s: s.ts)  # stable: the file's order within a second
    return sales[:limit] if limit else sales


def injection_points(n: int, seed: int, count: int = INJECTIONS_PER_FACTOR) -> list[int]:
    """``count`` distinct shift starts in ``[300, n - 300]``, drawn with ``random.Random(seed)``."""
    lo, hi = WARMUP_SALES, n - SHIFT_SALES
    if hi < lo:
        raise ValueError(f"a series of {n} sales is too short to inject {SHIFT_SALES}-sale shifts")
    return sorted(random.Random(seed).sample(range(lo, hi + 1), min(count, hi - lo + 1)))


def spurious_flags(prices: Sequence[float]) -> list[bool]:
    """Per position: would an alarm there be spurious (see the module docstring)?"""
    n = len(prices)
    flags = []
    for i in range(n):
        before = prices[max(0, i - SPURIOUS_HALF):i]
        after = prices[i + 1:i + 1 + SPURIOUS_HALF]
        if len(before) < SPURIOUS_MIN_SIDE or len(after) < SPURIOUS_MIN_SIDE:
            flags.append(True)
            continue
        flags.append(abs(statistics.median(after) / statistics.median(before) - 1.0) < SPURIOUS_MOVE)
    return flags


# -- the detectors tried ------------------------------------------------------

@dataclass(frozen=True)
class Candidate:
    """A detector family: a name, a factory per setting and the settings to try."""

    name: str
    make: Callable[[Any], Scorer]
    grid: tuple
    describe: Callable[[Any], dict]


def _cusum(h: float) -> Scorer:
    return TrendBreak(replace(TrendParams(), h=h))


DETECTORS: dict[str, Candidate] = {
    "robust_cusum": Candidate(
        "robust_cusum", _cusum, (2.5, 3.0, 3.5, 4.0),
        lambda h: {"level": "rolling median of 200 sales (log price)", "drift": "robust two-sided CUSUM",
                   "k": TrendParams.k, "h": h, "clip": TrendParams.clip, "rearm": TrendParams.rearm}),
    "holt_winters_cusum": Candidate(
        "holt_winters_cusum",
        lambda h: TrendBreak(replace(TrendParams(), h=h), level="holt_winters",
                             level_params={"alpha": 0.1, "beta": 0.01}),
        (2.5, 3.0, 3.5, 4.0),
        lambda h: {"level": "river HoltWinters(alpha=0.1, beta=0.01) on the rolling median, projected half a window",
                   "drift": "robust two-sided CUSUM", "k": TrendParams.k, "h": h, "clip": TrendParams.clip}),
    "page_hinkley": Candidate(
        "page_hinkley",
        lambda p: TrendBreak(drift="page_hinkley", drift_params={"min_instances": 15, "delta": p[0], "threshold": p[1]}),
        ((0.1, 6.0), (0.1, 8.0), (0.1, 12.0), (0.2, 4.0), (0.2, 6.0)),
        lambda p: {"level": "rolling median of 200 sales", "drift": "river PageHinkley on residuals clipped to 0.4",
                   "delta": p[0], "threshold": p[1], "min_instances": 15}),
    "adwin": Candidate(
        "adwin",
        lambda d: TrendBreak(drift="adwin", drift_params={"delta": d, "clock": 1, "grace_period": 15}),
        (0.002, 0.001, 0.0001, 0.00001),
        lambda d: {"level": "rolling median of 200 sales", "drift": "river ADWIN on residuals clipped to 0.4",
                   "delta": d, "clock": 1, "grace_period": 15}),
    "kswin": Candidate(
        "kswin",
        lambda a: TrendBreak(drift="kswin", drift_params={"alpha": a, "window_size": 100, "stat_size": 30, "seed": 7}),
        (1e-6, 1e-8),
        lambda a: {"level": "rolling median of 200 sales", "drift": "river KSWIN on residuals clipped to 0.4",
                   "alpha": a, "window_size": 100, "stat_size": 30}),
    "baseline": Candidate(
        "baseline", lambda thr: MedianThreshold(recent=25, reference=200, threshold=thr),
        tuple(round(0.30 + 0.05 * i, 2) for i in range(15)),
        lambda thr: {"rule": "|log(median of last 25 / median of the 200 before)| > threshold", "threshold": thr}),
}


# What evaluate() runs unless told otherwise: KSWIN runs a two-sample KS test
# per sale (~0.3 ms), which alone takes about a minute on the full series;
# ask for it by name (detectors=(*FAST, "kswin")).
FAST = tuple(name for name in DETECTORS if name != "kswin")


# -- running ---------------------------------------------------------------

def _alarmed(out) -> bool:
    return any(s.kind == "trend_break" for s in out.signals)


@dataclass
class _Run:
    setting: Any
    alarms: list[int]
    snapshots: dict[int, Optional[bytes]]
    false_per_10k: float
    spurious_per_10k: float


def _run_original(scorer: Scorer, sales: Sequence[Sale], snap_at: set[int], spurious: Sequence[bool],
                  setting: Any) -> _Run:
    states: dict[str, Any] = {}
    alarms: list[int] = []
    snaps: dict[int, Optional[bytes]] = {}
    for i, sale in enumerate(sales):
        key = scorer.key(sale)
        if i in snap_at:
            snaps[i] = None if key not in states else scorer.dump(states[key])
        if key is None:
            continue
        state = states.get(key)
        if state is None:
            state = scorer.new_state(key)
        if _alarmed(scorer.score(state, sale)):
            alarms.append(i)
        states[key] = scorer.learn(state, sale)
    n = len(sales)
    return _Run(setting, alarms, snaps, 1e4 * len(alarms) / n,
                1e4 * sum(1 for i in alarms if spurious[i]) / n)


def _delay(scorer: Scorer, sales: Sequence[Sale], start: int, factor: Decimal, snapshot: Optional[bytes]) -> Optional[int]:
    state = None if snapshot is None else scorer.load(snapshot)
    for k in range(SHIFT_SALES):
        sale = sales[start + k]
        shifted = replace(sale, price=sale.price * factor)
        key = scorer.key(shifted)
        if key is None:
            continue
        if state is None:
            state = scorer.new_state(key)
        if _alarmed(scorer.score(state, shifted)):
            return k + 1
        state = scorer.learn(state, shifted)
    return None


def _injections(scorer: Scorer, sales: Sequence[Sale], run: _Run, points: Sequence[int]) -> dict[str, Any]:
    by_factor: dict[str, float] = {}
    delays: list[int] = []
    hits = total = 0
    for f in FACTORS:
        factor = Decimal(str(f))
        found = 0
        for p in points:
            d = _delay(scorer, sales, p, factor, run.snapshots[p])
            total += 1
            if d is not None:
                found += 1
                delays.append(d)
        hits += found
        by_factor[str(f)] = round(found / len(points), 3)
    alarms = run.alarms
    chance = sum(1 for p in points if any(p <= a < p + SHIFT_SALES for a in alarms)) / len(points)
    return {
        "drift_detected_share": round(hits / total, 3),
        "drift_delay_median": statistics.median(delays) if delays else None,
        "false_alarms_per_10k": round(run.false_per_10k, 2),
        "spurious_alarms_per_10k": round(run.spurious_per_10k, 2),
        "by_factor": by_factor,
        "chance_share": round(chance, 3),
    }


def _tune(cand: Candidate, sales: Sequence[Sale], spurious: Sequence[bool], tune_points: list[int],
          report_points: list[int], budget_false: float, budget_spurious: Optional[float]) -> dict[str, Any]:
    snap_at = set(tune_points) | set(report_points)
    runs = [_run_original(cand.make(s), sales, snap_at, spurious, s) for s in cand.grid]

    def in_budget(r: _Run) -> bool:
        return r.false_per_10k <= budget_false + 1e-9 and (
            budget_spurious is None or r.spurious_per_10k <= budget_spurious + 1e-9)

    feasible = [r for r in runs if in_budget(r)]
    if feasible:
        scored = []
        for r in feasible:
            res = _injections(cand.make(r.setting), sales, r, tune_points)
            delay = res["drift_delay_median"] if res["drift_delay_median"] is not None else math.inf
            scored.append((-res["drift_detected_share"], delay, r.false_per_10k, r, res))
        scored.sort(key=lambda t: t[:3])
        best, tuned = scored[0][3], scored[0][4]
    else:
        best = min(runs, key=lambda r: (r.false_per_10k, r.spurious_per_10k))
        tuned = _injections(cand.make(best.setting), sales, best, tune_points)
    report = _injections(cand.make(best.setting), sales, best, report_points)
    report["params"] = cand.describe(best.setting)
    report["budget_met"] = bool(feasible)
    report["tune"] = {"drift_detected_share": tuned["drift_detected_share"],
                      "drift_delay_median": tuned["drift_delay_median"],
                      "settings_tried": len(runs), "settings_in_budget": len(feasible)}
    return report


def evaluate(sales_csv: Path, seed_tune: int = 1, seed_report: int = 5, *, limit: Optional[int] = None,
             count: int = INJECTIONS_PER_FACTOR, detectors: Iterable[str] = FAST) -> dict[str, Any]:
    """Evaluate the trend-break detectors; returns the JSON object of issue 9, point 7.

    Parameters
    ----------
    sales_csv
        The CryptoPunks sales CSV (``streams/replay/data/cryptopunks_sales.csv``).
    seed_tune, seed_report
        Seeds of the injection points used to choose each detector's setting
        and to report its figures (must differ).
    limit
        Use only the first ``limit`` sales (tests); the command uses all.
    count
        Injection points per factor.
    detectors
        Names from :data:`DETECTORS` to run (default :data:`FAST`: all but
        ``kswin``, which alone takes about a minute); the default detector
        (``robust_cusum``) is always run, and ``baseline`` is tuned to its
        false-alarm rate.

    Returns
    -------
    dict
        ``drift_detected_share``, ``drift_delay_median``,
        ``false_alarms_per_10k``, ``spurious_alarms_per_10k`` of the default
        detector, ``default`` (its name), ``detectors`` (name -> the same keys,
        plus ``by_factor``, ``chance_share``, ``params``, ``budget_met`` and
        the tuning-seed figures), ``by_factor`` (the default's detection share
        per factor) and ``evaluation`` (what was run, seeds, targets and
        whether the default meets them).
    """
    if seed_tune == seed_report:
        raise ValueError("seed_tune and seed_report must differ: figures are never reported on the tuning seed")
    started = time.perf_counter()
    sales = load_sales(Path(sales_csv), limit)
    n = len(sales)
    spurious = spurious_flags([float(s.price) for s in sales])
    tune_points = injection_points(n, seed_tune, count)
    report_points = injection_points(n, seed_report, count)
    names = [DEFAULT] + [d for d in dict.fromkeys(detectors) if d != DEFAULT]
    unknown = [d for d in names if d not in DETECTORS]
    if unknown:
        raise ValueError(f"unknown detectors {unknown}; known: {sorted(DETECTORS)}")
    results: dict[str, dict[str, Any]] = {}
    results[DEFAULT] = _tune(DETECTORS[DEFAULT], sales, spurious, tune_points, report_points,
                             BUDGET_FALSE, BUDGET_SPURIOUS)
    for name in names[1:]:
        if name == "baseline":
            budget = results[DEFAULT]["false_alarms_per_10k"]
            results[name] = _tune(DETECTORS[name], sales, spurious, tune_points, report_points, budget, None)
            results[name]["tuned_to"] = f"false_alarms_per_10k <= {budget} (the default's)"
        else:
            results[name] = _tune(DETECTORS[name], sales, spurious, tune_points, report_points,
                                  BUDGET_FALSE, BUDGET_SPURIOUS)
    d = results[DEFAULT]
    big = min(d["by_factor"]["0.5"], d["by_factor"]["2.0"])
    delay = d["drift_delay_median"]
    met = {
        "drift_detected_share": d["drift_detected_share"] >= TARGETS["drift_detected_share"],
        "drift_detected_share_0.5_and_2.0": big >= TARGETS["drift_detected_share_0.5_and_2.0"],
        "drift_delay_median": delay is not None and delay <= TARGETS["drift_delay_median"],
        "false_alarms_per_10k": d["false_alarms_per_10k"] <= TARGETS["false_alarms_per_10k"],
        "spurious_alarms_per_10k": d["spurious_alarms_per_10k"] <= TARGETS["spurious_alarms_per_10k"],
    }
    if "baseline" in results:
        met["above_baseline"] = d["drift_detected_share"] > results["baseline"]["drift_detected_share"]
    return {
        "drift_detected_share": d["drift_detected_share"],
        "drift_delay_median": d["drift_delay_median"],
        "false_alarms_per_10k": d["false_alarms_per_10k"],
        "spurious_alarms_per_10k": d["spurious_alarms_per_10k"],
        "default": DEFAULT,
        "detectors": results,
        "by_factor": d["by_factor"],
        "evaluation": {
            "series": "CryptoPunks sales 2017-06..2021-04 (price in ETH)",
            "sales": n,
            "seed_tune": seed_tune,
            "seed_report": seed_report,
            "injections_per_factor": len(report_points),
            "factors": list(FACTORS),
            "shift_sales": SHIFT_SALES,
            "spurious_rule": f"|median(next {SPURIOUS_HALF}) / median(previous {SPURIOUS_HALF}) - 1| < {SPURIOUS_MOVE}",
            "budget": {"false_alarms_per_10k": BUDGET_FALSE, "spurious_alarms_per_10k": BUDGET_SPURIOUS},
            "targets": TARGETS,
            "targets_met": met,
            "seconds": round(time.perf_counter() - started, 1),
        },
    }
