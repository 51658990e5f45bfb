"""Run the worker: in this process (``artwatch worker``) or as a child process
that the demo, the benchmark and the tests start, watch and stop."""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from infra.errors import ArtwatchError
from infra.settings import Settings

__all__ = ["run_worker", "WorkerProcess", "settings_env", "with_free_ports"]

log = logging.getLogger(__name__)


def run_worker(settings: Settings, parent_pid: Optional[int] = None) -> None:
    """Serve metrics and health, migrate (waiting for the database however
    long it takes), run the Faust worker until SIGTERM/SIGINT (or, with
    ``parent_pid``, until that process is gone)."""
    import faust
    import uvloop

    from infra.health import FAILING, Health, serve
    from infra.metrics import build_metrics
    from streams.app import create_app

    # uvloop: the worker is CPU-bound on event-loop plumbing (aiokafka fetches,
    # psycopg waits, producer acks); it must be installed before faust binds a loop.
    uvloop.install()
    _fix_malloc_thresholds()
    if parent_pid is not None:
        _exit_with_parent(parent_pid)
    metrics = build_metrics()
    health = Health(metrics.health)
    health.set("start", FAILING, "starting")
    w = settings.worker
    if w.metrics_port:  # first, so a worker waiting for its database can be watched
        serve(health, metrics.registry, w.metrics_bind, w.metrics_port)
        log.info("metrics on http://%s:%d/metrics, health on /health", w.metrics_bind, w.metrics_port)
    report = _migrate_when_reachable(settings, health)
    log.info("schema ready (timescale=%s, applied=%s)", report.timescale, list(report.applied) or "none")
    health.set("start", FAILING, "starting: joining the consumer group")
    (settings.data_dir / "faust").mkdir(parents=True, exist_ok=True)  # faust makes only its own folder in it
    app = create_app(settings, metrics, health)
    _quiet_repeats("aiokafka")
    # Each event allocates a handful of short-lived objects; the default gen-0
    # threshold (700) runs the cycle collector every few dozen events.
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    faust.Worker(app, loglevel=settings.log_level, quiet=True).execute_from_commandline()


class _Repeats(logging.Filter):
    """One record per (logger, level, message template) per ``every`` seconds."""

    def __init__(self, every: float = 10.0) -> None:
        super().__init__()
        self.every = every
        self._last: dict[tuple, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg))
        now = time.monotonic()
        if now - self._last.get(key, float("-inf")) < self.every:
            return False
        self._last[key] = now
        return True


def _quiet_repeats(package: str) -> None:
    """aiokafka logs every reconnect attempt (dozens of lines a second while a
    broker is away): keep one of each kind per ~10 s. Its loggers exist once
    its modules are imported (by faust, in create_app)."""
    repeats = _Repeats(10.0)
    for name in list(logging.Logger.manager.loggerDict):
        if name == package or name.startswith(package + "."):
            logging.getLogger(name).addFilter(repeats)


def _migrate_when_reachable(settings: Settings, health):
    """``migrate``, retried while the database is unreachable (transient
    errors, ``infra.db.failures``) with backoff up to 10 s, one log line per
    step at most every ~10 s and /health degraded meanwhile; a deterministic
    error (a missing extension, no privilege) is raised at once."""
    import psycopg

    from infra.db.failures import classify, describe
    from infra.db.migrate import migrate
    from infra.health import DEGRADED
    from infra.retry import Backoff, Throttle
    from infra.stack import mask_dsn

    # A bounded connect: a database behind a blackholed address would otherwise wait for the OS (minutes).
    dsn = psycopg.conninfo.make_conninfo(settings.dsn(), connect_timeout=settings.worker.db_connect_timeout_s)
    backoff, say = Backoff(0.5, 10.0), Throttle(10.0)
    started = time.monotonic()
    while True:
        try:
            return migrate(dsn, timescale=settings.timescale)
        except Exception as exc:  # noqa: BLE001 - sorted by classify: wait, or raise
            if not classify(exc).transient:
                raise
            delay = backoff.next()
            health.set("start", DEGRADED, f"waiting for the database to migrate: {describe(exc)}")
            if say.ready():
                log.warning("waiting for the database at %s (%.0fs so far): %s; next try in %.1fs",
                            mask_dsn(settings.dsn()), time.monotonic() - started, describe(exc), delay)
            time.sleep(delay)


def _fix_malloc_thresholds(size: int = 128 * 1024) -> None:
    """Keep glibc from raising its mmap and trim thresholds at run time.

    After the worker frees a large block (a ~1 MiB message, a 4 MiB fetch
    buffer), glibc raises both thresholds, so later large blocks come from
    the heap and RSS creeps up with fragmentation (measured: 124 -> 153 MiB
    over 80,000 malformed messages, then jumps of ~11 MiB at random) though
    what the worker holds is flat. Fixed at glibc's own defaults, large
    blocks are mapped and unmapped and RSS follows the live memory (flat at
    ~128 MiB; tests/faults/test_worker_memory.py). Not glibc: nothing to do.
    """
    import ctypes
    import ctypes.util

    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        for param in (m_mmap_threshold, m_trim_threshold):
            libc.mallopt(param, size)
    except (OSError, AttributeError):
        log.debug("mallopt is not available; glibc's dynamic malloc thresholds stay")


def _exit_with_parent(pid: int) -> None:
    """SIGTERM this process (a clean Faust shutdown) once ``pid`` is no longer
    its parent: a demo or test killed with SIGKILL must not leave its worker
    behind, retrying a broker that is gone."""

    def watch() -> None:
        while os.getppid() == pid:
            time.sleep(0.5)
        log.warning("parent process %d is gone; stopping", pid)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def with_free_ports(settings: Settings) -> Settings:
    """``settings`` with unused metrics and web ports, so a watched worker's
    progress is read from that worker and not from another one already
    serving the default ports."""

    with socket.socket() as a, socket.socket() as b:  # both held open: two different ports
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        ports = {"metrics_port": a.getsockname()[1], "web_port": b.getsockname()[1]}
    return settings.model_copy(update={"worker": settings.worker.model_copy(update=ports)})


def settings_env(settings: Settings) -> dict[str, str]:
    """``settings`` as ARTWATCH_* variables, so a child process sees the same run."""
    env = {
        "ARTWATCH_APP_ID": settings.app_id,
        "ARTWATCH_BROKER_URL": settings.broker_url,
        "ARTWATCH_DATABASE_URL": settings.dsn(),
        "ARTWATCH_DATA_DIR": str(settings.data_dir),
        "ARTWATCH_LOG_LEVEL": settings.log_level,
        "ARTWATCH_TIMESCALE": settings.timescale,
    }
    for section in ("topics", "validation", "worker", "rules"):
        env[f"ARTWATCH_{section.upper()}"] = getattr(settings, section).model_dump_json()
    return env


_SAMPLE = re.compile(r"^(artwatch_[a-z_]+)(\{[^}]*\})? (\S+)$", re.M)


class WorkerProcess:
    """A worker child process with its log file and metrics endpoint.

    Parameters
    ----------
    settings
        Passed to the child as environment (see :func:`settings_env`);
        ``worker.metrics_port`` must be set, it is how progress is read.
    log_path
        Where the child's output goes.
    """

    def __init__(self, settings: Settings, log_path: Path) -> None:
        if not settings.worker.metrics_port:
            raise ArtwatchError("a watched worker needs worker.metrics_port")
        self.settings = settings
        self.log_path = log_path
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "WorkerProcess":
        env = {k: v for k, v in os.environ.items() if not k.startswith("ARTWATCH_")}
        env.update(settings_env(self.settings))
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "artwatch.cli", "worker", "--parent-pid", str(os.getpid())],
                env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        return self

    def metrics(self) -> dict[str, float]:
        """Current artwatch samples, summed over labels, e.g. ``events_stored_total``."""
        url = f"http://127.0.0.1:{self.settings.worker.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=2) as resp:
            text = resp.read().decode()
        out: dict[str, float] = {}
        for name, _labels, value in _SAMPLE.findall(text):
            key = name.removeprefix("artwatch_streams_").removeprefix("artwatch_")
            out[key] = out.get(key, 0.0) + float(value)
        return out

    def health(self) -> tuple[int, dict]:
        """``(HTTP status, {"status": ..., "reason": ...})`` of its /health."""
        url = f"http://127.0.0.1:{self.settings.worker.metrics_port}/health"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:  # 503: failing, with the same JSON body
            with exc:
                return exc.code, json.loads(exc.read())

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Until the worker owns partitions of its input topics."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise ArtwatchError(f"worker exited early (code {self.proc.returncode}); see {self.log_path}")
            try:
                if self.metrics().get("assigned_partitions", 0) > 0:
                    return
            except OSError:
                pass
            time.sleep(0.25)
        raise ArtwatchError(f"worker not ready after {timeout:.0f}s; see {self.log_path}")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (clean shutdown, offsets committed), SIGKILL past ``timeout``."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("worker did not stop in %.0fs; killing it", timeout)
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: the crash the tests recover from."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
