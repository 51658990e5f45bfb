"""Replay of real market history plus labelled synthetic events.

* :mod:`~streams.replay.sources` loads the real CryptoPunks sales, punk
  attributes and Chinese art-auction bids shipped in ``data/``;
* :mod:`~streams.replay.synthetic` makes seeded synthetic listings and punk
  bids around the real sales (``synthetic=True``);
* :mod:`~streams.replay.pixelart` draws synthetic 24x24 avatars or cuts tiles
  from a user-supplied CryptoPunks sprite sheet (:mod:`~streams.replay.png`
  is the minimal PNG codec);
* :mod:`~streams.replay.timeline` merges everything in event-time order;
* :mod:`~streams.replay.publisher` sends a timeline to Kafka.

Data licences: ``data/LICENSE.md``.
"""

from streams.replay.pixelart import sprite_image_events, synthetic_image_event
from streams.replay.publisher import ensure_topics, publish
from streams.replay.sources import load_auction_bids, load_punk_attributes, load_punk_sales
from streams.replay.synthetic import SyntheticConfig, synthetic_listings, synthetic_punk_bids
from streams.replay.timeline import build_timeline, count_kinds, iter_timeline

__all__ = [
    "load_punk_sales",
    "load_auction_bids",
    "load_punk_attributes",
    "SyntheticConfig",
    "synthetic_listings",
    "synthetic_punk_bids",
    "synthetic_image_event",
    "sprite_image_events",
    "build_timeline",
    "iter_timeline",
    "count_kinds",
    "publish",
    "ensure_topics",
]
