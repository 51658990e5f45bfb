"""The ``artwatch`` command line: the one place that builds Settings and the
composition root above infra, models, streams and alerts (each command
imports what it runs lazily, so ``artwatch --help`` stays fast)."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from datetime import datetime
from pathlib import Path
from typing import Callable, Optional, Sequence

from pydantic import ValidationError

from infra.errors import ArtwatchError, ConfigError
from infra.settings import Settings

__all__ = ["main"]

log = logging.getLogger("artwatch")


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("kafka", "aiokafka"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _cmd_stack(settings: Settings, args: argparse.Namespace) -> int:
    from infra.stack import Stack

    stack = Stack(settings)
    result = {"up": stack.up, "down": stack.down, "status": stack.status}[args.action]()
    print(json.dumps(result, indent=2, default=str))
    if args.action == "status":
        return 0 if stack.healthy(result) else 3
    return 0


def _cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    from infra.db.migrate import migrate

    report = migrate(settings.dsn(), timescale=args.timescale or settings.timescale)
    print(json.dumps({"applied": report.applied, "timescale": report.timescale, "hypertables": report.hypertables}))
    return 0


def _cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    from streams.worker import run_worker

    run_worker(settings, parent_pid=args.parent_pid)
    return 0


def _iso(value: str) -> datetime:
    ts = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if ts.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{value!r} needs a time zone, e.g. 2021-01-01T00:00:00Z")
    return ts


def _positive(kind: type, zero_ok: bool = False) -> "Callable[[str], int | float]":
    def parse(value: str):
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
        if not (number >= 0 if zero_ok else number > 0):  # also refuses nan
            raise argparse.ArgumentTypeError(f"must be {'>=' if zero_ok else '>'} 0, got {value}")
        return number

    return parse


def _existing_file(value: str) -> Path:
    path = Path(value)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {value}")
    return path


def _cmd_replay(settings: Settings, args: argparse.Namespace) -> int:
    from streams.replay.publisher import ensure_topics, publish
    from streams.replay.timeline import build_timeline, count_kinds

    timeline = build_timeline(
        args.seed, limit=args.limit, include=tuple(args.include), sprite_path=args.sprite, start=args.start
    )
    print(f"replaying {len(timeline)} events {count_kinds(timeline)} (seed {args.seed}) to {settings.broker_url}",
          file=sys.stderr)
    ensure_topics(settings.broker_url, settings.topics, settings.worker.partitions)
    counts = publish(
        timeline, settings.broker_url, settings.topics, speedup=args.speedup,
        progress=lambda n: print(f"\r  published {n}/{len(timeline)}", end="", file=sys.stderr),
    )
    print(file=sys.stderr)
    print(json.dumps(counts))
    return 0


def _cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    from streams.demo import run_demo

    return run_demo(settings, events=args.events, seed=args.seed, start=args.start, keep_stack=args.keep_stack,
                    seconds=args.seconds)


def _cmd_bench(settings: Settings, args: argparse.Namespace) -> int:
    from streams.bench import bench_ingest

    result = bench_ingest(settings, events=args.events, rounds=args.rounds, workers=args.workers,
                          broker_storage=args.broker_storage)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>24}: {v}")
    return 0


def _cmd_eval(settings: Settings, args: argparse.Namespace) -> int:
    from importlib import resources

    from models.detectors.evaluate import evaluate

    if args.seed_tune == args.seed_report:
        raise ConfigError("--seed-tune and --seed-report must differ: figures are never reported on the tuning seed")
    sales = args.sales or Path(str(resources.files("streams.replay") / "data" / "cryptopunks_sales.csv"))
    print(f"evaluating the trend-break detectors on {sales} (tune seed {args.seed_tune},"
          f" report seed {args.seed_report}; about half a minute)", file=sys.stderr)
    result = evaluate(sales, seed_tune=args.seed_tune, seed_report=args.seed_report, limit=args.limit,
                      **({"count": args.count} if args.count else {}))
    text = json.dumps(result, indent=None if args.json else 2, default=str)
    if args.out:
        args.out.write_text(text + "\n")
        print(f"report written to {args.out}", file=sys.stderr)
    print(text)
    return 0


def _interrupt_on_termination() -> None:
    """SIGTERM and SIGHUP (a ``kill``, a closed terminal) end a command the way
    Ctrl-C does, so its ``finally`` blocks stop the worker and the stack it
    started instead of leaving them orphaned. A second signal interrupts that
    cleanup too."""

    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="artwatch", description="Real-time art and NFT market monitor.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("stack", help="start, stop or check the embedded broker (and its S3 store) and database")
    s.add_argument("action", choices=("up", "down", "status"))
    s.set_defaults(func=_cmd_stack)

    s = sub.add_parser("migrate", help="create or update the database schema")
    s.add_argument("--timescale", choices=("auto", "on", "off"), default=None,
                   help="default: ARTWATCH_TIMESCALE (auto: hypertables when the extension is installed)")
    s.set_defaults(func=_cmd_migrate)

    s = sub.add_parser("worker", help="run the stream worker (validate, store, roll up, alert)")
    s.add_argument("--parent-pid", type=int, default=None,
                   help="stop cleanly when this process exits (how the demo, bench and tests start workers)")
    s.set_defaults(func=_cmd_worker)

    s = sub.add_parser("replay", help="publish real market history (plus labelled synthetic events)")
    s.add_argument("--seed", type=int, default=7, help="seed of the synthetic listings, bids and images")
    s.add_argument("--limit", type=_positive(int), default=None, help="publish only the first N events")
    s.add_argument("--start", type=_iso, default=None, help="begin at this event time (ISO 8601 with zone)")
    s.add_argument("--speedup", type=_positive(float), default=None, help="divide event-time gaps by this; default: as fast as possible")
    s.add_argument("--include", nargs="+", default=["sales", "bids", "listings", "images"],
                   choices=("sales", "bids", "listings", "images", "auction_bids", "punk_bids"))
    s.add_argument("--sprite", type=_existing_file, default=None,
                   help="CryptoPunks sprite PNG to cut item images from (default: synthetic pixel art)")
    s.set_defaults(func=_cmd_replay)

    s = sub.add_parser("demo", help="stack up, worker, replay real history with a live display, summary, shut down")
    s.add_argument("--events", type=_positive(int), default=3000)
    s.add_argument("--seed", type=int, default=7)
    s.add_argument("--start", type=_iso, default=_iso("2020-12-26T00:00:00Z"),
                   help="event time to start from (default covers punk sales and art-auction bids)")
    s.add_argument("--seconds", type=_positive(float, zero_ok=True), default=8.0,
                   help="replay the history over about this many seconds, in its own rhythm (0: as fast as possible)")
    s.add_argument("--keep-stack", action="store_true", help="leave the broker and database running")
    s.set_defaults(func=_cmd_demo)

    s = sub.add_parser("bench", help="benchmarks; each prints its figures and its same-run baseline")
    bsub = s.add_subparsers(dest="bench", required=True)
    b = bsub.add_parser("ingest", help="pipeline vs raw consume, idempotent sink vs plain COPY")
    b.add_argument("--events", type=_positive(int), default=100_000)
    b.add_argument("--rounds", type=_positive(int), default=2, help="sink/COPY rounds; the best of each is reported")
    b.add_argument("--workers", type=_positive(int), default=1, help="worker processes in one consumer group")
    b.add_argument("--broker-storage", choices=("s3", "memory", "both"), default=None,
                   help="storage of the bench's own broker; both: one run on each, with the ratio"
                        " (default: ARTWATCH_BROKER_STORAGE)")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.set_defaults(func=_cmd_bench)

    s = sub.add_parser("eval", help="model and detector evaluations on held-out data, with their baselines")
    esub = s.add_subparsers(dest="eval", required=True)
    e = esub.add_parser("detectors", help="trend-break detectors on the real CryptoPunks series with injected shifts")
    e.add_argument("--sales", type=_existing_file, default=None, help="sales CSV (default: the shipped CC0 history)")
    e.add_argument("--seed-tune", type=int, default=1, help="injection seed each detector's setting is chosen on")
    e.add_argument("--seed-report", type=int, default=5, help="injection seed the figures are reported on")
    e.add_argument("--out", type=Path, default=None, help="also write the report (JSON) to this file")
    e.add_argument("--limit", type=_positive(int), default=None, help="only the first N sales (a quick look)")
    e.add_argument("--count", type=_positive(int), default=None, help="injection points per factor")
    e.add_argument("--json", action="store_true", help="print one JSON line")
    e.set_defaults(func=_cmd_eval)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"artwatch: bad configuration:\n{exc}", file=sys.stderr)
        return 2
    _setup_logging(settings.log_level)
    if args.func is not _cmd_worker:  # the Faust worker handles its own signals
        _interrupt_on_termination()
    try:
        return args.func(settings, args)
    except (ArtwatchError, OSError) as exc:  # OSError: a data folder that cannot be made, a port not bound
        print(f"artwatch: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        import psycopg

        if not isinstance(exc, psycopg.OperationalError):
            raise
        from infra.stack import mask_dsn

        print(f"artwatch: cannot use the database at {mask_dsn(settings.dsn())}: {str(exc).strip()}\n"
              "  (start the embedded one with `artwatch stack up`, or check ARTWATCH_DATABASE_URL)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
