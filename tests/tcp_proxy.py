"""A real TCP forwarder in front of a real server, which a test can cut.

The outage tests put it between a worker and the machine's PostgreSQL (which
others share, so it is never stopped): ``cut("refuse")`` resets every
forwarded connection and stops listening (connection refused, like a
database that is down or restarting); ``cut("blackhole")`` keeps accepting
but forwards nothing (a network that drops packets: only timeouts help):
connections open at the cut stay open and their bytes are swallowed (each
end's TCP still acknowledges, as behind a middlebox or in front of a frozen
server, so keepalives and ``tcp_user_timeout`` never fire), and new ones are
accepted and never answered; ``restore()`` forwards again on the same port
and resets the connections that lost bytes meanwhile (their streams are
broken), as a healed route shows a client.
"""

from __future__ import annotations

import selectors
import socket
import struct
import threading
from typing import Literal, Optional

__all__ = ["TcpProxy"]


def _reset(sock: socket.socket) -> None:
    """Close with RST, as a crashed server or a dropped route looks to a client."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class TcpProxy:
    """Forward ``127.0.0.1:<port>`` to ``target``; one thread runs everything.

    Examples
    --------
    Not a doctest (it needs a server); in prose: ``with TcpProxy(("127.0.0.1",
    5432)) as proxy:`` then connect to ``proxy.port``; ``proxy.cut()`` and
    ``proxy.restore()`` around the outage.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.mode: Literal["forward", "refuse", "blackhole"] = "forward"
        self._lock = threading.Lock()
        self._sel = selectors.DefaultSelector()
        self._pairs: dict[socket.socket, Optional[socket.socket]] = {}  # each end -> the other (None: closed)
        self._held: list[socket.socket] = []  # accepted while blackholed
        self._lost: set[socket.socket] = set()  # forwarded ends whose bytes a blackhole swallowed
        self._listener: Optional[socket.socket] = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._stop = False
        self.port = self._listen(0)
        self.accepted = 0  # connections forwarded so far
        self._thread = threading.Thread(target=self._run, name="tcp-proxy", daemon=True)
        self._thread.start()

    def __enter__(self) -> "TcpProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- control (any thread) ----------------------------------------------

    def cut(self, mode: Literal["refuse", "blackhole"] = "refuse") -> None:
        with self._lock:
            self.mode = mode
        self._call()

    def restore(self) -> None:
        with self._lock:
            self.mode = "forward"
        self._call()

    def close(self) -> None:
        self._stop = True
        self._call()
        self._thread.join(10)

    def _call(self) -> None:
        self._applied = threading.Event()
        self._wake_w.send(b"x")
        self._applied.wait(10)

    # -- the loop (its own thread) -----------------------------------------

    def _listen(self, port: int) -> int:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen(64)
        s.setblocking(False)
        self._sel.register(s, selectors.EVENT_READ, "accept")
        self._listener = s
        return s.getsockname()[1]

    def _apply(self) -> None:
        with self._lock:
            mode = self.mode
        if self._stop or mode == "refuse":
            if self._listener is not None:
                self._sel.unregister(self._listener)
                self._listener.close()
                self._listener = None
        elif self._listener is None:
            self._listen(self.port)
        if self._stop or mode == "refuse":
            for sock in list(self._pairs):
                self._drop(sock)
        if self._stop or mode == "forward":
            for sock in list(self._lost):
                self._drop(sock)
        if self._stop or mode != "blackhole":
            for sock in self._held:
                _reset(sock)
            self._held.clear()

    def _drop(self, sock: socket.socket) -> None:
        other = self._pairs.pop(sock, None)
        for s in (sock, other):
            if s is not None:
                self._pairs.pop(s, None)
                self._lost.discard(s)
                try:
                    self._sel.unregister(s)
                except (KeyError, ValueError):
                    pass
                _reset(s)

    def _run(self) -> None:
        while True:
            for key, _ in self._sel.select(timeout=1.0):
                if key.data == "wake":
                    self._wake_r.recv(1024)
                    self._apply()
                    self._applied.set()
                    if self._stop:
                        return
                elif key.data == "accept":
                    self._accept(key.fileobj)
                else:
                    self._pump(key.fileobj)

    def _accept(self, listener: socket.socket) -> None:
        try:
            client, _ = listener.accept()
        except OSError:
            return
        with self._lock:
            mode = self.mode
        if mode == "blackhole":
            self._held.append(client)  # accepted, never answered
            return
        try:
            server = socket.create_connection(self.target, timeout=5)
        except OSError:
            _reset(client)
            return
        for s in (client, server):
            s.setblocking(False)
        self._pairs[client], self._pairs[server] = server, client
        self._sel.register(client, selectors.EVENT_READ, "pump")
        self._sel.register(server, selectors.EVENT_READ, "pump")
        self.accepted += 1

    def _pump(self, sock: socket.socket) -> None:
        if sock not in self._pairs:
            return
        other = self._pairs[sock]
        with self._lock:
            mode = self.mode
        try:
            data = sock.recv(65536)
        except OSError:
            data = b""  # reset by its peer: like a close
        if mode == "blackhole":
            if data:  # swallowed: read (so TCP acknowledges it), never delivered
                self._lost.update(s for s in (sock, other) if s is not None)
                return
            # This end closed; its FIN is lost too: the other end hears nothing until restore().
            self._sel.unregister(sock)
            self._pairs.pop(sock, None)
            self._lost.discard(sock)
            sock.close()
            if other is not None:
                self._pairs[other] = None
                self._lost.add(other)
            return
        if data and other is not None:
            try:
                other.setblocking(True)  # small local volumes: a blocking send keeps this simple
                other.sendall(data)
                other.setblocking(False)
                return
            except OSError:
                pass
        self._drop(sock)
