"""Run the worker: in this process (``artwatch worker``) or as a child process
that the demo, the benchmark and the tests start, watch and stop."""

from __future__ import annotations

import gc
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Optional

from infra.errors import ArtwatchError
from infra.settings import Settings

__all__ = ["run_worker", "WorkerProcess", "settings_env", "with_free_ports"]

log = logging.getLogger(__name__)


def run_worker(settings: Settings, parent_pid: Optional[int] = None) -> None:
    """Migrate, serve metrics, run the Faust worker until SIGTERM/SIGINT (or,
    with ``parent_pid``, until that process is gone)."""
    import faust
    import uvloop
    from prometheus_client import start_http_server

    from infra.db.migrate import migrate
    from infra.metrics import build_metrics
    from streams.app import create_app

    # uvloop: the worker is CPU-bound on event-loop plumbing (aiokafka fetches,
    # psycopg waits, producer acks); it must be installed before faust binds a loop.
    uvloop.install()
    if parent_pid is not None:
        _exit_with_parent(parent_pid)
    report = migrate(settings.dsn(), timescale=settings.timescale)
    log.info("schema ready (timescale=%s, applied=%s)", report.timescale, list(report.applied) or "none")
    metrics = build_metrics()
    if settings.worker.metrics_port:
        w = settings.worker
        start_http_server(w.metrics_port, addr=w.metrics_bind, registry=metrics.registry)
        log.info("metrics on http://%s:%d/metrics", w.metrics_bind, w.metrics_port)
    (settings.data_dir / "faust").mkdir(parents=True, exist_ok=True)  # faust makes only its own folder in it
    app = create_app(settings, metrics)
    # Each event allocates a handful of short-lived objects; the default gen-0
    # threshold (700) runs the cycle collector every few dozen events.
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    faust.Worker(app, loglevel=settings.log_level, quiet=True).execute_from_commandline()


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
                [sys.executable, "-m", "infra.cli", "worker", "--parent-pid", str(os.getpid())],
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
