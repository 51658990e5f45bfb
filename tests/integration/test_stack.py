"""The local stack starts, answers, stops cleanly, refuses ports it does not
own, keeps the broker's data across restarts (s3 storage) and lets no one in:
passwords, private files, 127.0.0.1 only, no symlink followed."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import psycopg
import pytest

from infra.db.migrate import migrate
from infra.errors import ConfigError, StackError
from infra.settings import Settings
from infra.stack import PG_SYSTEM_USER, S3_BUCKET, Stack, s3_auth_headers
from tests.conftest import free_port, unavailable

pytestmark = [pytest.mark.integration, pytest.mark.broker]

EXTERNAL_DSN = "postgresql://postgres@127.0.0.1:5432/test"


def _gone(pid: int) -> bool:
    """True when ``pid`` has exited (a zombie nobody reaped counts as exited)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def _answers(dsn: str) -> bool:
    try:
        with psycopg.connect(dsn, connect_timeout=3) as conn:
            return conn.execute("SELECT 1").fetchone() == (1,)
    except psycopg.Error:
        return False


def _settings(tmp_path: Path, **kw) -> Settings:
    kw.setdefault("database_url", None)  # explicit, so an ARTWATCH_DATABASE_URL in the env cannot leak in
    return Settings(data_dir=tmp_path, broker_url=f"127.0.0.1:{free_port()}",
                    embedded_pg_port=free_port(), **kw)


@pytest.fixture
def external_db() -> str:
    if not _answers(EXTERNAL_DSN):
        unavailable(f"no PostgreSQL at {EXTERNAL_DSN}")
    return EXTERNAL_DSN


@pytest.fixture
def stacks():
    """Stacks a test creates; stopped at teardown whatever happened."""
    made: list[Stack] = []
    yield made
    for stack in made:
        stack.down()


async def _roundtrip(bootstrap: str, topic: str) -> bytes:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"hello", key=b"k")
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()  # no group: assigning the partition skips a rebalance of several seconds
    consumer.assign([TopicPartition(topic, 0)])
    try:
        msg = await asyncio.wait_for(consumer.getone(), 15)
        return msg.value
    finally:
        await consumer.stop()


def _listening(pid: int) -> set[str]:
    """The addresses (``ip:port``) process ``pid`` accepts TCP connections on."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            link = os.readlink(fd)
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    found = set()
    for table, size in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ip_hex, port_hex = fields[1].split(":")
                raw = bytes.fromhex(ip_hex)
                # /proc writes each 32-bit word in host (little-endian) order.
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                ip = socket.inet_ntop(socket.AF_INET if size == 4 else socket.AF_INET6, words)
                found.add(f"{ip}:{int(port_hex, 16)}")
    return found


def _private(path: Path) -> bool:
    """Neither group nor others may read, write or enter (0600 / 0700); as
    root a folder on PostgreSQL's way may keep x (enter, not list: 0711)."""
    st = os.lstat(path)
    allowed = 0o011 if stat.S_ISDIR(st.st_mode) and os.geteuid() == 0 else 0
    return not stat.S_IMODE(st.st_mode) & 0o077 & ~allowed


def _s3_status(endpoint: str, keys: tuple[str, str], method: str = "HEAD") -> int:
    port = int(endpoint.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        headers = s3_auth_headers(method, f"127.0.0.1:{port}", f"/{S3_BUCKET}", *keys) if keys else {}
        conn.request(method, f"/{S3_BUCKET}", headers=headers)
        return conn.getresponse().status
    finally:
        conn.close()


def test_up_status_use_down(tmp_path: Path, stacks: list) -> None:
    settings = _settings(tmp_path)
    stack = Stack(settings)
    stacks.append(stack)
    assert stack.status()["broker"]["running"] is False

    st = stack.up()
    assert st["broker"]["running"] and st["broker"]["started"] and st["broker"]["storage"] == "s3"
    assert st["s3"]["running"] and st["s3"]["started"] and st["s3"]["endpoint"].startswith("http://127.0.0.1:")
    assert st["database"]["running"] and st["database"]["embedded"] and st["database"]["started"]
    assert (settings.stack_dir / "tansu.pid").read_text().split("\n")[0] == str(st["broker"]["pid"])

    again = stack.up()  # idempotent: reports, starts nothing
    assert not again["broker"]["started"] and not again["s3"]["started"] and not again["database"]["started"]
    names = ("broker", "s3", "database")
    assert [again[k]["pid"] for k in names] == [st[k]["pid"] for k in names]
    assert Stack(settings).status()["broker"]["pid"] == st["broker"]["pid"]  # a fresh handle sees it too

    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=settings.broker_url)
    try:
        admin.create_topics([NewTopic("stack-test", num_partitions=1, replication_factor=1)])
        assert "stack-test" in admin.list_topics()
    finally:
        admin.close()
    assert asyncio.run(_roundtrip(settings.broker_url, "stack-test")) == b"hello"
    assert _answers(settings.dsn())
    # The embedded server has no TimescaleDB: requiring it is a clear error, not a stack trace.
    with pytest.raises(ConfigError, match="ARTWATCH_TIMESCALE=on but the timescaledb extension is not installed"):
        migrate(settings.dsn(), timescale="on")

    # Reachable from this machine only: every port of every process.
    for name in ("broker", "s3", "database"):
        addresses = _listening(st[name]["pid"])
        assert addresses and all(a.startswith("127.0.0.1:") for a in addresses), (name, addresses)
    assert len(_listening(st["s3"]["pid"])) == 10  # master, volume, filer, s3, admin: http + grpc

    # PostgreSQL wants the password, which is in no DSN; over TCP and over its socket.
    assert "password=" not in settings.dsn() and "passfile=" in settings.dsn()
    no_password = tmp_path / "empty.pgpass"
    no_password.write_text("")
    no_password.chmod(0o600)
    for host in ("127.0.0.1", str(settings.stack_dir / "pgsock")):
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(host=host, port=settings.embedded_pg_port, user="postgres", dbname="postgres",
                            passfile=str(no_password), connect_timeout=5)
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(host=host, port=settings.embedded_pg_port, user="postgres", dbname="postgres",
                            password="not-it", connect_timeout=5)
    # The S3 store takes this stack's keys only.
    keys = tuple(json.loads((settings.stack_dir / "s3" / "credentials.json").read_text())
                 ["identities"][0]["credentials"][0][k] for k in ("accessKey", "secretKey"))
    assert _s3_status(st["s3"]["endpoint"], keys) == 200
    assert _s3_status(st["s3"]["endpoint"], ()) == 403
    assert _s3_status(st["s3"]["endpoint"], (keys[0], "wrong-secret")) == 403
    # Nothing the stack wrote is readable by others; the secrets are 0600.
    made = [p for p in settings.stack_dir.iterdir() if p.name != "pg"] + list((settings.stack_dir / "s3").iterdir())
    assert {"pg.pass", "pg.log", "tansu.log", "s3.log", "tansu.pid", "s3.pid", "s3"} <= {p.name for p in made}
    assert [p for p in [settings.stack_dir, *made] if not _private(p)] == []
    for secret in ("pg.pass", "s3/credentials.json", "s3/security.toml"):
        assert stat.S_IMODE((settings.stack_dir / secret).stat().st_mode) == 0o600, secret

    pids = [st["broker"]["pid"], st["s3"]["pid"], st["database"]["pid"]]
    down = stack.down()
    assert not down["broker"]["running"] and not down["s3"]["running"] and not down["database"]["running"]
    assert all(_gone(pid) for pid in pids)
    assert not (settings.stack_dir / "tansu.pid").exists() and not (settings.stack_dir / "s3.pid").exists()
    assert not (settings.stack_dir / "pg" / "postmaster.pid").exists()
    assert stack.down()["broker"]["running"] is False  # safe when nothing runs


def test_context_manager_and_stale_pid_file(tmp_path: Path, external_db: str) -> None:
    settings = _settings(tmp_path, database_url=external_db)
    settings.stack_dir.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (settings.stack_dir / "tansu.pid").write_text(f"{dead.pid}\n")

    with Stack(settings).running() as stack:
        pid = stack.status()["broker"]["pid"]
        assert pid is not None and pid != dead.pid
    assert _gone(pid) and not (settings.stack_dir / "tansu.pid").exists()


def test_external_database_is_only_checked(tmp_path: Path, external_db: str, stacks: list) -> None:
    settings = _settings(tmp_path, database_url=external_db)
    stack = Stack(settings)
    stacks.append(stack)
    st = stack.up()
    assert st["broker"]["running"]
    assert st["database"] == {"dsn": external_db, "embedded": False, "running": True, "pid": None,
                              "log": None, "started": False}
    assert not (settings.stack_dir / "pg").exists()
    stack.down()
    assert _answers(external_db)


def test_broker_port_taken(tmp_path: Path, external_db: str) -> None:
    settings = _settings(tmp_path, database_url=external_db)
    port = int(settings.broker_url.rsplit(":", 1)[1])
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        with pytest.raises(StackError, match=rf"{port}.*ARTWATCH_BROKER_URL"):
            Stack(settings).up()
    assert not (settings.stack_dir / "tansu.pid").exists()


def test_pg_port_taken_stops_the_broker_again(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    stack = Stack(settings)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", settings.embedded_pg_port))
        squatter.listen()
        with pytest.raises(StackError, match=rf"{settings.embedded_pg_port}.*ARTWATCH_EMBEDDED_PG_PORT"):
            stack.up()
    assert stack.status()["broker"]["running"] is False
    assert not (settings.stack_dir / "tansu.pid").exists()


def test_broker_dying_at_startup_shows_its_log(tmp_path: Path, external_db: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "tansu"
    fake.write_text("#!/bin/sh\necho 'boom: cannot start' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CALF_TANSU_BIN", str(fake))
    settings = _settings(tmp_path, database_url=external_db)
    with pytest.raises(StackError, match="exited during startup(.|\n)*boom: cannot start"):
        Stack(settings).up(timeout=10)
    assert not (settings.stack_dir / "tansu.pid").exists()
    assert not Stack(settings).status()["s3"]["running"], "the S3 server started for it was left running"


def _impostor(argv0: str) -> subprocess.Popen:
    """A live process whose command line says ``argv0`` (e.g. another PostgreSQL)."""
    return subprocess.Popen(["bash", "-c", f"exec -a '{argv0}' sleep 60"])


def test_a_recycled_pid_is_never_taken_for_ours(tmp_path: Path) -> None:
    """After a crash the pid files may name someone else's postgres or tansu:
    status must not report it and down must not signal it."""
    settings = _settings(tmp_path)
    (settings.stack_dir / "pg").mkdir(parents=True)
    pg_like = _impostor("postgres: 15/main: checkpointer")
    tansu_like = _impostor("tansu broker --listener-url tcp://127.0.0.1:9092")
    weed_like = _impostor("weed mini -dir=/elsewhere")
    impostors = [pg_like, tansu_like, weed_like]

    def plant() -> None:
        (settings.stack_dir / "pg" / "postmaster.pid").write_text(f"{pg_like.pid}\n/elsewhere\n0\n5432\n")
        (settings.stack_dir / "tansu.pid").write_text(f"{tansu_like.pid}\n")
        (settings.stack_dir / "s3.pid").write_text(f"{weed_like.pid}\n8333\n")

    try:
        plant()
        stack = Stack(settings)
        st = stack.status()
        assert not any(st[k]["running"] for k in ("broker", "s3", "database")), st
        stack.down()
        assert all(p.poll() is None for p in impostors), "down signalled a process that is not ours"
        # The files are stale, not ours: `up` starts over them (PostgreSQL would refuse a live pid's lock file).
        plant()
        st = stack.up()
        assert st["broker"]["started"] and st["s3"]["started"] and st["database"]["started"], st
        assert {st[k]["pid"] for k in ("broker", "s3", "database")}.isdisjoint(p.pid for p in impostors)
        stack.down()
        assert all(p.poll() is None for p in impostors)
    finally:
        for p in impostors:
            p.kill()
            p.wait()


def test_two_ups_at_once_start_one_stack(tmp_path: Path, external_db: str, stacks: list) -> None:
    settings = _settings(tmp_path, database_url=external_db)
    results: list = []
    errors: list = []

    def up() -> None:
        try:
            results.append(Stack(settings).up())
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    import threading

    threads = [threading.Thread(target=up) for _ in range(2)]
    stacks.append(Stack(settings))
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors, errors
    assert sorted(r["broker"]["started"] for r in results) == [False, True]
    assert results[0]["broker"]["pid"] == results[1]["broker"]["pid"] == Stack(settings).status()["broker"]["pid"]


def test_a_different_pg_port_says_what_runs_where(tmp_path: Path, stacks: list) -> None:
    settings = _settings(tmp_path)
    stacks.append(Stack(settings))
    Stack(settings).up()
    moved = settings.model_copy(update={"embedded_pg_port": free_port()})
    with pytest.raises(StackError, match=f"already runs on port {settings.embedded_pg_port}"):
        Stack(moved).up(timeout=20)
    assert Stack(settings).status()["database"]["running"]  # the running one is left alone


# -- durable broker ------------------------------------------------------------
def _publish_through_restart(bootstrap: str, topic: str, n: int, acked: list[int]) -> None:
    """Publish ``0..n-1`` as a stream of small batches; what a broker restart
    leaves unacknowledged is sent again (at least once) until all are acknowledged."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import KafkaError

    async def run() -> None:
        pending, deadline = list(range(n)), time.monotonic() + 120
        while pending:
            assert time.monotonic() < deadline, f"{len(pending)} messages never acknowledged"
            producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", request_timeout_ms=5000)
            try:
                await producer.start()
                while pending:
                    chunk = pending[:50]
                    futures = [await producer.send(topic, str(i).encode(), partition=0) for i in chunk]
                    results = await asyncio.gather(*futures, return_exceptions=True)
                    ok = {i for i, r in zip(chunk, results) if not isinstance(r, BaseException)}
                    pending = [i for i in pending if i not in ok]
                    acked[0] += len(ok)
                    if len(ok) < len(chunk):
                        raise KafkaError(f"{len(chunk) - len(ok)} sends failed")
                    await asyncio.sleep(0.01)  # a stream, so the restart lands in the middle of it
            except (KafkaError, OSError, asyncio.TimeoutError):
                await asyncio.sleep(0.3)
            finally:
                with contextlib.suppress(Exception):
                    await producer.stop()

    asyncio.run(run())


def _read_all(bootstrap: str, topic: str, expect: int, timeout: float = 30) -> list[int]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    async def run() -> list[int]:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            tp = TopicPartition(topic, 0)
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            end = (await consumer.end_offsets([tp]))[tp]
            got: list[int] = []
            deadline = time.monotonic() + timeout
            while len(set(got)) < expect and await consumer.position(tp) < end and time.monotonic() < deadline:
                batch = await consumer.getmany(tp, timeout_ms=1000)
                got += [int(r.value) for r in batch.get(tp, [])]
            return got
        finally:
            await consumer.stop()

    return asyncio.run(run())


def _create_topic(bootstrap: str, topic: str) -> None:
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        admin.close()


def test_a_broker_killed_mid_stream_loses_nothing(tmp_path: Path, external_db: str, stacks: list) -> None:
    """The default (s3) storage: SIGKILL the broker while a producer streams,
    start it again, and every message is there; then the whole stack goes
    down and up (its S3 server on new ports) and they are still there."""
    settings = _settings(tmp_path, database_url=external_db)
    stack = Stack(settings)
    stacks.append(stack)
    st = stack.up()
    assert st["broker"]["storage"] == "s3" and st["s3"]["running"]
    n, topic, acked = 3000, "durable", [0]
    _create_topic(settings.broker_url, topic)
    publisher = threading.Thread(target=_publish_through_restart, args=(settings.broker_url, topic, n, acked))
    publisher.start()
    try:
        deadline = time.monotonic() + 60
        while acked[0] < n // 3 and time.monotonic() < deadline and publisher.is_alive():
            time.sleep(0.01)
        assert n // 3 <= acked[0] < n, f"the broker was to die mid-stream, {acked[0]} of {n} acknowledged"
        os.kill(st["broker"]["pid"], signal.SIGKILL)
        while not _gone(st["broker"]["pid"]):
            time.sleep(0.05)
        at_kill = acked[0]
        again = stack.up()
        assert again["broker"]["started"] and not again["s3"]["started"]
    finally:
        publisher.join(150)
    assert not publisher.is_alive() and acked[0] >= n, f"publisher stuck at {acked[0]} of {n}"
    got = _read_all(settings.broker_url, topic, n)
    assert set(got) == set(range(n)), f"{n - len(set(got))} lost ({at_kill} acknowledged before the kill)"
    assert len(got) < 2 * n  # resent ones may repeat (at least once), but the log is not doubled

    # The S3 server killed too (how `down` ends one that hangs at SIGTERM), then a clean down and up.
    stack.down(services=("broker",))
    s3_pid = stack.status()["s3"]["pid"]
    sockets = Stack._weed_grpc_sockets(stack._s3_ports())
    assert all(p.is_socket() for p in sockets)
    os.kill(s3_pid, signal.SIGKILL)
    while not _gone(s3_pid):
        time.sleep(0.05)
    st = stack.up()
    assert st["s3"]["started"] and st["broker"]["started"]
    assert set(_read_all(settings.broker_url, topic, n)) == set(range(n))
    assert not any(p.exists() for p in sockets), "the killed S3 server's sockets were left in /tmp"
    stack.down()
    st = stack.up()
    assert st["s3"]["started"] and st["broker"]["started"]
    assert set(_read_all(settings.broker_url, topic, n)) == set(range(n))


def test_memory_storage_still_works_and_forgets_on_restart(tmp_path: Path, external_db: str, stacks: list) -> None:
    settings = _settings(tmp_path, database_url=external_db, broker_storage="memory")
    stack = Stack(settings)
    stacks.append(stack)
    st = stack.up()
    assert st["broker"]["storage"] == "memory" and not st["s3"]["running"] and "started" not in st["s3"]
    assert not (settings.stack_dir / "s3").exists()
    _create_topic(settings.broker_url, "volatile")
    assert asyncio.run(_roundtrip(settings.broker_url, "volatile")) == b"hello"
    stack.down(services=("broker",))
    stack.up()
    # What ARTWATCH_BROKER_STORAGE=memory means, and why s3 is the default.
    from kafka.admin import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=settings.broker_url)
    try:
        assert "volatile" not in admin.list_topics()
    finally:
        admin.close()


def test_switching_storage_under_a_running_broker_is_refused(tmp_path: Path, external_db: str,
                                                             stacks: list) -> None:
    settings = _settings(tmp_path, database_url=external_db, broker_storage="memory")
    stacks.append(Stack(settings))
    Stack(settings).up()
    with pytest.raises(StackError, match="does not use s3 storage.*stack down"):
        Stack(settings.model_copy(update={"broker_storage": "s3"})).up(timeout=20)


# -- who gets in -----------------------------------------------------------------
def _write_as_server(path: Path, text: str) -> None:
    """Rewrite a file in the data folder keeping its owner (the server's user as root)."""
    with open(path, "w") as out:
        out.write(text)


def test_a_trust_data_folder_of_an_older_version_is_switched_to_a_password(tmp_path: Path, stacks: list) -> None:
    settings = _settings(tmp_path)
    stack = Stack(settings)
    stacks.append(stack)
    stack.up()
    stack.down()
    # What an older artwatch left: trust for everyone, no password file.
    hba = settings.stack_dir / "pg" / "pg_hba.conf"
    _write_as_server(hba, "local all all trust\nhost all all 127.0.0.1/32 trust\n")
    settings.pg_passfile.unlink()

    stack.up()
    assert settings.pg_passfile.exists() and _answers(settings.dsn())
    assert "trust" not in hba.read_text()
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(host="127.0.0.1", port=settings.embedded_pg_port, user="postgres", dbname="postgres",
                        password="", connect_timeout=5)

    # A server still running with trust cannot be switched live: a clear error says what to do.
    _write_as_server(hba, "host all all 127.0.0.1/32 trust\n")
    with psycopg.connect(settings.dsn(), autocommit=True) as conn:
        conn.execute("SELECT pg_reload_conf()")
    with pytest.raises(StackError, match=r"runs without passwords.*stack down.*stack up"):
        Stack(settings).up(timeout=20)


@pytest.mark.parametrize("planted", ["tansu.log", "pg.pass", "s3.pid", "pgsock", "s3"])
def test_a_symlink_planted_where_the_stack_writes_is_refused(tmp_path: Path, planted: str) -> None:
    """Another local user could plant a link where the stack makes a file or
    folder; following it would write (as root: anywhere) through it."""
    settings = _settings(tmp_path / "data")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "file").write_text("untouched")
    settings.stack_dir.mkdir(parents=True)
    target = victim if planted in ("pgsock", "s3") else victim / "file"
    (settings.stack_dir / planted).symlink_to(target)
    stack = Stack(settings)
    mode = stat.S_IMODE(victim.stat().st_mode)
    try:
        with pytest.raises(StackError, match="symbolic link"):
            stack.up(timeout=30)
        st = stack.status()
        assert not any(st[k]["running"] for k in ("broker", "s3", "database")), st
    finally:
        (settings.stack_dir / planted).unlink(missing_ok=True)
        stack.down()
    assert (victim / "file").read_text() == "untouched" and [p.name for p in victim.iterdir()] == ["file"]
    assert stat.S_IMODE(victim.stat().st_mode) == mode and victim.stat().st_uid == os.geteuid()


def test_a_stack_folder_someone_else_could_swap_is_refused(tmp_path: Path) -> None:
    """Links and mode checks inside the stack folder mean nothing if another
    user can rename the folder itself: its parents must be ours (or root's)."""
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    with pytest.raises(StackError, match="writable by everyone"):
        Stack(_settings(open_dir / "data")).up(timeout=5)
    if os.geteuid() == 0:
        theirs = tmp_path / "theirs"
        theirs.mkdir()
        os.chown(theirs, 65534, 65534)
        with pytest.raises(StackError, match="belongs to uid 65534"):
            Stack(_settings(theirs / "data")).up(timeout=5)
    sticky = tmp_path / "sticky"  # like /tmp: others may write but not rename what is ours
    sticky.mkdir()
    sticky.chmod(0o1777)
    assert Stack(_settings(sticky / "data", broker_storage="memory")).down()["broker"]["running"] is False


def test_a_long_stack_path_gets_an_unpredictable_private_socket_folder(tmp_path: Path, stacks: list) -> None:
    """Too long a path for a Unix socket: the server's socket goes to a fresh
    folder in the temp folder, not to a name someone could plant beforehand."""
    deep = tmp_path / ("d" * 60) / ("e" * 40)
    settings = _settings(deep)
    stack = Stack(settings)
    stacks.append(stack)
    stack.up()
    record = settings.stack_dir / "pgsock.path"
    sock = Path(record.read_text().strip())
    assert sock.parent == Path(tempfile.gettempdir()) and sock.name.startswith("artwatch-pgsock-")
    st = os.lstat(sock)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
    if os.geteuid() == 0:
        import pwd

        assert st.st_uid == pwd.getpwnam(PG_SYSTEM_USER).pw_uid
    assert list(sock.glob(".s.PGSQL.*"))  # the server listens there
    stack.down()
    assert not sock.exists() and not record.exists()
