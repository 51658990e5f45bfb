"""``artwatch demo``: the whole spine in one command on a fresh machine.

Stack up -> migrate -> worker -> replay a few thousand events of real history
(plus labelled synthetic listings, bids, images and three injected malformed
messages) with a live display -> summary and the query that shows the stored
series -> clean shutdown of what the demo started.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime
from typing import Optional

import psycopg
from rich.console import Console
from rich.live import Live
from rich.table import Table

from infra.db.migrate import migrate
from infra.errors import ArtwatchError
from infra.settings import Settings
from infra.stack import Stack, mask_dsn
from streams.replay.publisher import ensure_topics, kafka_client, publish
from streams.replay.timeline import build_timeline, count_kinds
from streams.worker import WorkerProcess, with_free_ports

__all__ = ["run_demo", "INJECTED"]

# Malformed on purpose, and labelled so in their keys: they show the dead-letter path.
INJECTED = [
    (b"injected-malformed-json", b'{"event_id": "demo-bad-1", "ts": '),
    (b"injected-negative-price", b'{"event_id":"demo-bad-2","ts":"2021-01-01T00:00:00Z","collection":"cryptopunks",'
     b'"item_id":"1","buyer":"0x1","seller":"0x2","price":"-5","currency":"ETH","synthetic":true}'),
    (b"injected-unknown-currency", b'{"event_id":"demo-bad-3","ts":"2021-01-01T00:00:00Z","collection":"cryptopunks",'
     b'"item_id":"1","buyer":"0x1","seller":"0x2","price":"5","currency":"DOGE","synthetic":true}'),
]


def _view(published: int, total: int, m: dict, rate: float, elapsed: float) -> Table:
    t = Table(title=f"artwatch demo — {elapsed:5.1f}s", show_header=False, min_width=48)
    t.add_row("published", f"{published:,} / {total:,}")
    t.add_row("consumed", f"{int(m.get('events_in_total', 0)):,}")
    t.add_row("rows stored (new)", f"{int(m.get('events_stored_total', 0)):,}")
    t.add_row("already stored", f"{int(m.get('events_duplicate_total', 0)):,}")
    t.add_row("dead letters", f"{int(m.get('deadletter_total', 0)):,}")
    t.add_row("alerts", f"{int(m.get('alerts_emitted_total', 0)):,}")
    t.add_row("events/s", f"{rate:,.0f}")
    return t


def run_demo(
    settings: Settings, events: int = 3000, seed: int = 7, start: Optional[datetime] = None, keep_stack: bool = False,
    seconds: float = 8.0,
) -> int:
    """Run the demo; ``seconds`` paces the replay over about that long (0: as fast as possible)."""
    if events < 1:
        raise ArtwatchError("--events must be >= 1")
    if seconds < 0:
        raise ArtwatchError("--seconds must be >= 0")
    console = Console(stderr=True)
    stack = Stack(settings)
    console.print("[bold]1/5[/] stack: broker + database")
    # Its own metrics and web ports: the progress read must be this worker's.
    worker = WorkerProcess(with_free_ports(settings), settings.data_dir / "demo-worker.log")
    mine: tuple[str, ...] = ()  # what this demo started, and so stops
    try:
        mine = Stack.started(stack.up())
        report = migrate(settings.dsn(), timescale=settings.timescale)
        console.print(f"[bold]2/5[/] schema ready (TimescaleDB: {report.timescale})")
        ensure_topics(settings.broker_url, settings.topics, settings.worker.partitions, include_outputs=True)
        timeline = build_timeline(seed, limit=events, start=start)
        worker.start()
        console.print(f"[bold]3/5[/] worker starting (pid {worker.proc.pid}, log: {worker.log_path})")
        with console.status("the worker is joining its consumer group (a few seconds)"):
            worker.wait_ready()
        total = len(timeline) + len(INJECTED)
        speedup = replay_speedup(timeline, seconds)
        pace = f"at {speedup:,.0f}x real time" if speedup else "as fast as possible"
        console.print(f"[bold]4/5[/] replaying {len(timeline):,} events {count_kinds(timeline)} + "
                      f"{len(INJECTED)} injected malformed messages, {pace}")
        done = _replay_live(console, settings, worker, timeline, total, speedup)
        summary = _summary(settings)
    finally:
        code = worker.stop()
        if mine and not keep_stack:
            stack.down(services=mine)
    left = "kept" if keep_stack or not mine else f"{' and '.join(mine)} stopped"
    console.print(f"[bold]5/5[/] worker stopped (exit {code}); stack {left}")
    _print_summary(console, summary, done, settings)
    return 0 if done else 1


def replay_speedup(timeline, seconds: float) -> Optional[float]:
    """The speed-up that replays ``timeline``'s event-time span in about ``seconds``
    (None: as fast as possible). Quiet stretches make it shorter: a single
    wait is capped (see ``streams.replay.publisher``).

    >>> from datetime import timedelta, timezone
    >>> from types import SimpleNamespace as Rec
    >>> t0 = datetime(2021, 1, 1, tzinfo=timezone.utc)
    >>> replay_speedup([("sales", "1", Rec(ts=t0)), ("sales", "2", Rec(ts=t0 + timedelta(days=1)))], 8)
    10800.0
    >>> replay_speedup([("sales", "1", Rec(ts=t0))], 8) is None
    True
    """
    if not seconds or len(timeline) < 2:
        return None
    span = (timeline[-1][2].ts - timeline[0][2].ts).total_seconds()
    return span / seconds if span > 0 else None


def _replay_live(
    console: Console, settings: Settings, worker: WorkerProcess, timeline, total: int, speedup: Optional[float]
) -> bool:
    sent = {"n": 0}
    errors: list[BaseException] = []

    def produce() -> None:
        try:
            publish(timeline, settings.broker_url, settings.topics, speedup=speedup,
                    progress=lambda n: sent.__setitem__("n", n), progress_every=20)
            from kafka import KafkaProducer

            producer = kafka_client(KafkaProducer, settings.broker_url, acks="all")
            for key, value in INJECTED:
                producer.send(settings.topics.sales, key=key, value=value)
            producer.flush()
            producer.close()
            sent["n"] = total
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    thread = threading.Thread(target=produce, daemon=True)
    t0 = time.monotonic()
    thread.start()
    base = worker.metrics()
    deadline = t0 + max(120.0, total / 200)
    last, last_t, rate = 0.0, t0, 0.0
    with Live(console=console, refresh_per_second=4) as live:
        while True:
            m = {k: v - base.get(k, 0) for k, v in worker.metrics().items()}
            processed = m.get("events_stored_total", 0) + m.get("events_duplicate_total", 0) + m.get("deadletter_total", 0)
            now = time.monotonic()
            if now - last_t >= 1.0:
                rate, last, last_t = (processed - last) / (now - last_t), processed, now
            finished = processed >= total and not thread.is_alive()
            if finished:  # the last frame shows the whole run's rate (a run under 1 s has no window yet)
                rate = processed / max(now - t0, 1e-3)
            live.update(_view(sent["n"], total, m, rate, now - t0))
            if errors:
                raise ArtwatchError(f"replay failed: {errors[0]}")
            if finished:
                return True
            if now > deadline or not worker.alive():
                console.print(f"[red]stopped waiting: {int(processed)}/{total} processed; see {worker.log_path}")
                return False
            time.sleep(0.25)


def _summary(settings: Settings) -> dict:
    with psycopg.connect(settings.dsn()) as conn:
        tables = {
            t: conn.execute(f"SELECT count(*), count(*) FILTER (WHERE synthetic) FROM {t}").fetchone()
            for t in ("sales", "listings", "bids", "images", "alerts")
        }
        dead = conn.execute("SELECT reason, count(*) FROM deadletters GROUP BY 1 ORDER BY 1").fetchall()
        alerts = conn.execute(
            "SELECT ts, collection, subject, evidence->>'price', evidence->>'median', evidence->>'ratio'"
            " FROM alerts ORDER BY ts DESC LIMIT 5"
        ).fetchall()
    return {"tables": tables, "dead": dead, "alerts": alerts}


def _print_summary(console: Console, s: dict, done: bool, settings: Settings) -> None:
    t = Table(title="stored (whole database)")
    for col in ("table", "rows", "synthetic"):
        t.add_column(col, justify="right" if col != "table" else "left")
    for name, (n, syn) in s["tables"].items():
        t.add_row(name, f"{n:,}", f"{syn:,}")
    console.print(t)
    if s["dead"]:
        console.print("dead letters by reason: " + ", ".join(f"{r} {n}" for r, n in s["dead"]))
    for ts, coll, item, price, median, ratio in s["alerts"]:
        console.print(f"alert sale_outlier {coll} #{item} at {ts:%Y-%m-%d %H:%M}: {price} vs median {median} ({ratio}x)")
    dsn = mask_dsn(settings.dsn())
    console.print("\nThe stored series (hourly rollups per collection, computed by the stream):")
    console.print(
        f'  psql "{dsn}" -c "SELECT bucket, collection, kind, currency, n, volume, min_price, max_price'
        ' FROM rollup_1h ORDER BY bucket DESC LIMIT 20"', soft_wrap=True, highlight=False,
    )
    if settings.database_url is None:
        console.print("  (embedded database: run `artwatch stack up` first, `artwatch stack down` after)")
    console.print("[green]demo complete[/]" if done else "[red]demo incomplete[/]")
