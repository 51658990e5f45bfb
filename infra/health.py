"""The worker's health and its HTTP endpoint: ``/metrics`` and ``/health`` on one port.

``/health`` answers JSON ``{"status": ..., "reason": ...}``:

* ``ready`` (200): consuming and storing.
* ``degraded`` (200): alive and waiting it out by itself: the database is
  unreachable (partitions paused, the batch in hand retried) or the broker is.
* ``failing`` (503): starting (not consuming yet), or stopped by an error that
  waiting cannot fix (the process is about to exit).

The status is the worst of its parts' (``start``, ``database``, ``broker``,
``fatal``); the reason names every part at that level. A part can be set by
several sources at once (the four sinks, each batch waiting): it reports the
worst of them, and one source clearing its state leaves the others standing,
so one pipeline recovering does not hide another that still retries.
prometheus_client's own server answers every path with the metrics, hence
this small handler.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.exposition import choose_encoder

__all__ = ["Health", "READY", "DEGRADED", "FAILING", "serve"]

log = logging.getLogger(__name__)

READY, DEGRADED, FAILING = "ready", "degraded", "failing"
_RANK = {READY: 0, DEGRADED: 1, FAILING: 2}
_GAUGE = {READY: 1.0, DEGRADED: 0.5, FAILING: 0.0}  # artwatch_streams_health_ratio


class Health:
    """Thread-safe: set by the event loop, read by the HTTP server's threads.

    Examples
    --------
    >>> h = Health()
    >>> h.set("database", DEGRADED, "connection refused")
    >>> h.set("start", FAILING, "starting")
    >>> h.status()
    ('failing', 'starting')
    >>> h.clear("start"); h.status()
    ('degraded', 'database: connection refused')
    >>> h.clear("database"); h.status()
    ('ready', '')

    Sources of one part: it stays degraded while any of them is.

    >>> h.set("database", DEGRADED, "sales: retrying", source="sales")
    >>> h.set("database", DEGRADED, "bids: retrying", source="bids")
    >>> h.clear("database", source="bids"); h.status()
    ('degraded', 'database: sales: retrying')
    >>> h.of("database"), h.clear("database", source="sales"), h.of("database")
    ('degraded', None, 'ready')
    """

    def __init__(self, gauge: Optional[Gauge] = None) -> None:
        self._lock = threading.Lock()
        self._parts: dict[tuple[str, str], tuple[str, str]] = {}  # (part, source) -> (status, reason)
        self._gauge = gauge
        self._publish()

    def set(self, part: str, status: str, reason: str, source: str = "") -> None:
        """``part`` is ``status`` for ``reason``, as far as ``source`` knows."""
        if status not in _RANK:
            raise ValueError(f"unknown health status {status!r}")
        with self._lock:
            changed = self._parts.get((part, source)) != (status, reason)
            self._parts[(part, source)] = (status, reason)
        if changed:
            self._publish()

    def clear(self, part: str, source: str = "") -> None:
        """``source`` has nothing to report on ``part`` (any other source's state stays)."""
        with self._lock:
            changed = self._parts.pop((part, source), None) is not None
        if changed:
            self._publish()

    def of(self, part: str) -> str:
        """The worst status ``part`` reports from any source (``ready`` when none reports)."""
        with self._lock:
            states = [s for (p, _), (s, _r) in self._parts.items() if p == part]
        return max(states, key=_RANK.__getitem__, default=READY)

    def status(self) -> tuple[str, str]:
        """(status, reason): the worst part's status and the reasons at that level."""
        with self._lock:
            parts = dict(self._parts)
        worst = max((s for s, _ in parts.values()), key=_RANK.__getitem__, default=READY)
        if worst == READY:
            return READY, ""
        # "start" speaks for itself; the others say which part it is.
        reasons = [r if p == "start" else f"{p}: {r}" for (p, _src), (s, r) in sorted(parts.items()) if s == worst]
        return worst, "; ".join(dict.fromkeys(reasons))  # one line per distinct reason

    def _publish(self) -> None:
        if self._gauge is not None:
            self._gauge.set(_GAUGE[self.status()[0]])


def serve(health: Health, registry: CollectorRegistry, host: str, port: int) -> ThreadingHTTPServer:
    """Serve ``/metrics`` (Prometheus exposition) and ``/health`` on ``host:port``
    from a daemon thread; returns the server (``shutdown()`` stops it)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            path = urlsplit(self.path).path
            if path == "/health":
                status, reason = health.status()
                body = json.dumps({"status": status, "reason": reason}).encode()
                self._reply(503 if status == FAILING else 200, "application/json", body)
            elif path in ("/metrics", "/"):
                encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                self._reply(200, content_type, encoder(registry))
            else:
                self._reply(404, "text/plain; charset=utf-8", b"not found: try /metrics or /health\n")

        def _reply(self, code: int, content_type: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:  # noqa: A002 - scrapes every few seconds: no access log
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
