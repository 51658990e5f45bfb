"""1 min and 1 h rollups per (collection, kind, currency), folded from new rows.

Computed by the stream (continuous aggregates are not in the Apache build of
TimescaleDB): the sink hands over exactly the rows its transaction inserted,
they are grouped here and merged into ``rollup_1m``/``rollup_1h`` in the same
transaction, so a replayed batch can never count twice.
"""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Context, Decimal, localcontext
from typing import Iterable

import msgspec
import psycopg
from psycopg import sql

__all__ = ["fold", "upsert_rollups"]

# (minute, collection, currency) -> [n, n_synthetic, volume, min, max]
Groups = dict[tuple[datetime, str, str], list]

# Volumes are summed exactly: prices carry up to ~39 digits (1e-18 to 1e21,
# streams.records), beyond the default context's 28, and numeric is exact.
_EXACT = Context(prec=100)


def fold(rows: Iterable[tuple[datetime, str, str, bool, Decimal]]) -> Groups:
    """Group ``(ts_utc, collection, currency, synthetic, price)`` rows by minute.

    Examples
    --------
    >>> from datetime import timezone
    >>> t = datetime(2021, 1, 1, 10, 0, 30, tzinfo=timezone.utc)
    >>> m = fold([(t, "punks", "ETH", False, Decimal("2")), (t, "punks", "ETH", True, Decimal("5"))])
    >>> m[(t.replace(second=0), "punks", "ETH")]
    [2, 1, Decimal('7'), Decimal('2'), Decimal('5')]
    """
    # Keyed by epoch minute (an int) while folding: datetime.replace() costs
    # ~2 µs per call, the whole fold must stay around 1 µs per row.
    by_minute: dict[tuple[int, str, str], list] = {}
    with localcontext(_EXACT):
        for ts, collection, currency, synthetic, price in rows:
            key = (int(ts.timestamp() // 60), collection, currency)
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
    return {(datetime.fromtimestamp(m * 60, timezone.utc), c, cur): g for (m, c, cur), g in by_minute.items()}


_MERGE = (
    " ON CONFLICT (collection, kind, currency, bucket) DO UPDATE SET"
    " n = r.n + EXCLUDED.n, n_synthetic = r.n_synthetic + EXCLUDED.n_synthetic,"
    " volume = r.volume + EXCLUDED.volume,"
    " min_price = LEAST(r.min_price, EXCLUDED.min_price),"
    " max_price = GREATEST(r.max_price, EXCLUDED.max_price)"
)
# One statement, one round trip: minute groups arrive as one JSON document,
# are merged into rollup_1m, and folded by hour in SQL into rollup_1h.
_UPSERT = (
    "WITH g AS (SELECT * FROM jsonb_to_recordset(%s::jsonb)"
    " AS g(b timestamptz, c text, cur text, n bigint, ns bigint, v numeric, lo numeric, hi numeric)),"
    " m AS (INSERT INTO rollup_1m AS r (bucket, collection, kind, currency, n, n_synthetic, volume, min_price, max_price)"
    " SELECT b, c, {k}, cur, n, ns, v, lo, hi FROM g" + _MERGE + ")"
    " INSERT INTO rollup_1h AS r (bucket, collection, kind, currency, n, n_synthetic, volume, min_price, max_price)"
    " SELECT date_bin('1 hour', b, timestamptz 'epoch'), c, {k}, cur, sum(n), sum(ns), sum(v), min(lo), max(hi)"
    " FROM g GROUP BY 1, 2, 4 ORDER BY 1, 2, 4" + _MERGE
)
_GROUP = msgspec.json.Encoder(decimal_format="string")


async def upsert_rollups(conn: psycopg.AsyncConnection, kind: str, minutes: Groups) -> None:
    """Merge folded minute groups into rollup_1m and rollup_1h (one statement).

    The groups travel as one JSON document: psycopg would pick a dumper per
    array element (~3 µs each); msgspec encodes them in C.
    """
    if not minutes:
        return
    doc = _GROUP.encode(
        [{"b": b, "c": c, "cur": cur, "n": g[0], "ns": g[1], "v": g[2], "lo": g[3], "hi": g[4]}
         # Sorted: concurrent batches then lock rollup rows in one order (no deadlocks).
         for (b, c, cur), g in sorted(minutes.items())]
    )
    await conn.execute(sql.SQL(_UPSERT).format(k=sql.Literal(kind)), (doc.decode(),))
