"""1 min and 1 h rollups per (collection, kind, currency), folded from new rows.

Computed by the stream (continuous aggregates are not in the Apache build of
TimescaleDB): the sink hands over exactly the rows its transaction inserted,
they are grouped here and merged into ``rollup_1m``/``rollup_1h`` in the same
transaction, so a replayed batch can never count twice.
"""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal
from typing import Iterable

import psycopg
from psycopg import sql

__all__ = ["fold", "upsert_rollups", "ROLLUP_TABLES"]

ROLLUP_TABLES = ("rollup_1m", "rollup_1h")

# group key -> [n, n_synthetic, volume, min, max]
Groups = dict[tuple[datetime, str, str], list]


def fold(rows: Iterable[tuple[datetime, str, str, bool, Decimal]]) -> tuple[Groups, Groups]:
    """Group ``(ts_utc, collection, currency, synthetic, price)`` rows by minute and by hour.

    Examples
    --------
    >>> from datetime import timezone
    >>> t = datetime(2021, 1, 1, 10, 0, 30, tzinfo=timezone.utc)
    >>> m, h = fold([(t, "punks", "ETH", False, Decimal("2")), (t, "punks", "ETH", True, Decimal("5"))])
    >>> m[(t.replace(second=0), "punks", "ETH")]
    [2, 1, Decimal('7'), Decimal('2'), Decimal('5')]
    >>> len(h)
    1
    """
    # Keyed by epoch minute (an int) while folding: datetime.replace() costs
    # ~2 µs per call, the whole fold must stay around 1 µs per row.
    by_minute: dict[tuple[int, str, str], list] = {}
    for ts, collection, currency, synthetic, price in rows:
        key = (int(ts.timestamp()) // 60, collection, currency)
        g = by_minute.get(key)
        if g is None:
            by_minute[key] = [1, int(synthetic), price, price, price]
        else:
            g[0] += 1
            g[1] += synthetic
            g[2] += price
            if price < g[3]:
                g[3] = price
            elif price > g[4]:
                g[4] = price
    minutes: Groups = {
        (datetime.fromtimestamp(m * 60, timezone.utc), c, cur): g for (m, c, cur), g in by_minute.items()
    }
    hours: Groups = {}
    for (minute, collection, currency), (n, n_syn, vol, lo, hi) in minutes.items():
        key = (minute.replace(minute=0), collection, currency)
        g = hours.get(key)
        if g is None:
            hours[key] = [n, n_syn, vol, lo, hi]
        else:
            g[0] += n
            g[1] += n_syn
            g[2] += vol
            g[3] = min(g[3], lo)
            g[4] = max(g[4], hi)
    return minutes, hours


_UPSERT = (
    "INSERT INTO {t} AS r (bucket, collection, kind, currency, n, n_synthetic, volume, min_price, max_price)"
    " SELECT b, c, {k}, cur, n, ns, v, lo, hi FROM unnest("
    "%s::timestamptz[], %s::text[], %s::text[], %s::bigint[], %s::bigint[], %s::numeric[], %s::numeric[], %s::numeric[])"
    " AS g(b, c, cur, n, ns, v, lo, hi)"
    " ON CONFLICT (collection, kind, currency, bucket) DO UPDATE SET"
    " n = r.n + EXCLUDED.n, n_synthetic = r.n_synthetic + EXCLUDED.n_synthetic,"
    " volume = r.volume + EXCLUDED.volume,"
    " min_price = LEAST(r.min_price, EXCLUDED.min_price),"
    " max_price = GREATEST(r.max_price, EXCLUDED.max_price)"
)


async def upsert_rollups(conn: psycopg.AsyncConnection, kind: str, minutes: Groups, hours: Groups) -> None:
    """Merge folded groups into both rollup tables (one statement each)."""
    for table, groups in zip(ROLLUP_TABLES, (minutes, hours)):
        if not groups:
            continue
        keys = list(groups)
        vals = list(groups.values())
        await conn.execute(
            sql.SQL(_UPSERT).format(t=sql.Identifier(table), k=sql.Literal(kind)),
            (
                [k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys],
                [v[0] for v in vals], [v[1] for v in vals], [v[2] for v in vals],
                [v[3] for v in vals], [v[4] for v in vals],
            ),
        )
