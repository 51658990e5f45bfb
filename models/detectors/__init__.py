"""Market detectors per collection, on the scorer seam (models/scorer.py).

One detector per module, each a :class:`models.scorer.Scorer` keyed by
``collection|currency|real`` (or ``|synthetic``: real and synthetic events
never share state):

* ``price_index``: the ``market_index`` series (rolling median of sales,
  floor, 24 h listings, sales and volume), one point per sale;
* ``trend``: ``trend_break`` from a robust level (rolling median of log
  prices) and a drift detector on the residuals (default: the robust CUSUM of
  ``cusum``; River's PageHinkley, ADWIN, KSWIN and HoltWinters as measured
  alternatives);
* ``floor``: ``floor_drop`` from live listings, or sales without them;
* ``volume``: ``volume_spike`` on sale and listing rates;
* ``median_threshold``: the baseline rule the evaluation compares against
  (not a live detector);
* ``evaluate``: the evaluation of point 7 (``evaluate(sales_csv, seed_tune,
  seed_report)``), for ``artwatch eval detectors --json``.

:func:`market_detectors` is the list a stage runs by default.
"""

from __future__ import annotations

__all__ = ["market_detectors"]


def market_detectors() -> list:
    """Fresh instances of the live market detectors, default settings:
    price index, trend break, floor drop, volume spike."""
    from models.detectors.floor import FloorTracker
    from models.detectors.price_index import PriceIndex
    from models.detectors.trend import TrendBreak
    from models.detectors.volume import VolumeSpike

    return [PriceIndex(), TrendBreak(), FloorTracker(), VolumeSpike()]
