"""The fault suite's own checks can fail: each is shown a database or a
connection in the state it must catch (a check that cannot fail proves
nothing, see issue 8's dead hour-level checks)."""

from __future__ import annotations

import time
from decimal import Decimal

import psycopg
import pytest

from tests.faults.helpers import (
    TcpProxy,
    assert_rollups_match,
    assert_stored_exactly_once,
    rollup_mismatches,
)

pytestmark = [pytest.mark.integration, pytest.mark.timescale, pytest.mark.timeout(120)]

_SALE = ("INSERT INTO sales (event_id, ts, collection, item_id, buyer, seller, price, currency, synthetic, source)"
         " VALUES (%s, %s, 'c', 'i', 'b', 's', %s, 'ETH', %s, 'test')")
_BID = ("INSERT INTO bids (event_id, ts, auction_id, item_id, collection, bidder, amount, currency, synthetic, source)"
        " VALUES (%s, %s, 'a', 'i', 'c', 'b', %s, 'ETH', false, 'test')")


def _rebuild_rollups(conn: psycopg.Connection) -> None:
    """Rollups as the stream should have written them, in plain SQL of its own
    (not the check's), following the table's key and columns."""
    key_has_synthetic = conn.execute(
        "SELECT count(*) FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)"
        " WHERE i.indrelid = 'rollup_1m'::regclass AND i.indisprimary AND a.attname = 'synthetic'").fetchone()[0]
    cols = [r[0] for r in conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = 'rollup_1m'::regclass AND attnum > 0"
        " AND NOT attisdropped ORDER BY attnum")]
    for table, width in (("rollup_1m", "1 minute"), ("rollup_1h", "1 hour")):
        conn.execute(f"DELETE FROM {table}")
        for kind, p in (("sales", "price"), ("bids", "amount"), ("listings", "price")):
            bucket = f"date_bin('{width}', ts, timestamptz 'epoch')"
            exprs = {
                "bucket": bucket, "collection": "collection", "kind": f"'{kind}'", "currency": "currency",
                "synthetic": "synthetic", "n": "count(*)", "n_synthetic": "count(*) FILTER (WHERE synthetic)",
                "volume": f"sum({p})", "min_price": f"min({p})", "max_price": f"max({p})",
            }
            group = [bucket, "collection", "currency"] + (["synthetic"] if key_has_synthetic else [])
            conn.execute(f"INSERT INTO {table} ({', '.join(cols)}) SELECT {', '.join(exprs[c] for c in cols)}"
                         f" FROM {kind} GROUP BY {', '.join(group)}")


def test_the_checks_catch_what_they_are_for(fresh_db) -> None:
    t = "2021-03-04T05:06:07Z"
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute(_SALE, ("s1", t, Decimal("1.000000000000000001"), False))
        conn.execute(_SALE, ("s2", "2021-03-04T05:06:59Z", Decimal("2.5"), True))
        conn.execute(_SALE, ("s3", "2021-03-04T05:59:00Z", Decimal("7"), False))
        conn.execute(_BID, ("b1", t, Decimal("3")))
        published = {"sales": {"s1", "s2", "s3"}, "bids": {"b1"}, "listings": set(), "images": set()}
        assert_stored_exactly_once(fresh_db, published)
        with pytest.raises(AssertionError, match="1 missing"):
            assert_stored_exactly_once(fresh_db, {**published, "sales": {"s1", "s2", "s3", "s4"}})
        with pytest.raises(AssertionError, match="1 never published"):
            assert_stored_exactly_once(fresh_db, {**published, "sales": {"s1", "s2"}})

        with pytest.raises(AssertionError, match="differs"):  # no rollups at all
            assert_rollups_match(fresh_db)
        _rebuild_rollups(conn)
        assert_rollups_match(fresh_db)
        n_roll, n_raw, bad = rollup_mismatches(conn, "rollup_1h")
        assert n_roll == n_raw > 0 and not bad

        # Off by one wei, one count, a lost group, a stray group: each is caught, in either table.
        for table, change in (
            ("rollup_1m", "UPDATE rollup_1m SET volume = volume + 1e-18 WHERE kind = 'sales' AND volume > 1"),
            ("rollup_1h", "UPDATE rollup_1h SET n = n + 1 WHERE kind = 'bids'"),
            ("rollup_1h", "UPDATE rollup_1h SET max_price = 6.9999 WHERE kind = 'sales'"),
            ("rollup_1m", "DELETE FROM rollup_1m WHERE kind = 'bids'"),
            ("rollup_1m", "UPDATE rollup_1m SET collection = 'other' WHERE kind = 'bids'"),
        ):
            _rebuild_rollups(conn)
            conn.execute(change)
            _n, _raw, bad = rollup_mismatches(conn, table)
            assert bad, f"not caught: {change}"
        # Equal numbers written differently are equal (numeric, not text).
        _rebuild_rollups(conn)
        conn.execute("UPDATE rollup_1h SET volume = volume * 1.000 WHERE kind = 'bids'")
        assert_rollups_match(fresh_db)


def test_the_proxy_cuts_the_database_off_and_lets_it_back(fresh_db) -> None:
    info = psycopg.conninfo.conninfo_to_dict(fresh_db)
    proxy = TcpProxy((info.get("host") or "127.0.0.1", int(info.get("port") or 5432)))
    try:
        via = psycopg.conninfo.make_conninfo(fresh_db, host="127.0.0.1", port=proxy.port)
        with psycopg.connect(via, autocommit=True) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            assert proxy.connections() == 1
            proxy.cut()
            with pytest.raises(psycopg.OperationalError):
                conn.execute("SELECT 1")
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(via, connect_timeout=3)
        assert proxy.refused >= 1
        proxy.restore()
        with psycopg.connect(via, autocommit=True) as conn:
            assert conn.execute("SELECT 2").fetchone() == (2,)
    finally:
        proxy.close()
    deadline = time.monotonic() + 5
    while proxy.connections() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proxy.connections() == 0
