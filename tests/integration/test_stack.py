"""The local stack starts, answers, stops cleanly and refuses ports it does not own."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
from pathlib import Path

import psycopg
import pytest

from infra.db.migrate import migrate
from infra.errors import ConfigError, StackError
from infra.settings import Settings
from infra.stack import Stack
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


def test_up_status_use_down(tmp_path: Path, stacks: list) -> None:
    settings = _settings(tmp_path)
    stack = Stack(settings)
    stacks.append(stack)
    assert stack.status()["broker"]["running"] is False

    st = stack.up()
    assert st["broker"]["running"] and st["broker"]["started"]
    assert st["database"]["running"] and st["database"]["embedded"] and st["database"]["started"]
    assert (settings.stack_dir / "tansu.pid").read_text().strip() == str(st["broker"]["pid"])

    again = stack.up()  # idempotent: reports, starts nothing
    assert not again["broker"]["started"] and not again["database"]["started"]
    assert again["broker"]["pid"] == st["broker"]["pid"] and again["database"]["pid"] == st["database"]["pid"]
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

    pids = [st["broker"]["pid"], st["database"]["pid"]]
    down = stack.down()
    assert not down["broker"]["running"] and not down["database"]["running"]
    assert all(_gone(pid) for pid in pids)
    assert not (settings.stack_dir / "tansu.pid").exists()
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
    try:
        (settings.stack_dir / "pg" / "postmaster.pid").write_text(f"{pg_like.pid}\n/elsewhere\n0\n5432\n")
        (settings.stack_dir / "tansu.pid").write_text(f"{tansu_like.pid}\n")
        stack = Stack(settings)
        st = stack.status()
        assert not st["broker"]["running"] and not st["database"]["running"], st
        stack.down()
        assert pg_like.poll() is None and tansu_like.poll() is None, "down signalled a process that is not ours"
        # The files are stale, not ours: `up` starts over them (PostgreSQL would refuse a live pid's lock file).
        (settings.stack_dir / "pg" / "postmaster.pid").write_text(f"{pg_like.pid}\n/elsewhere\n0\n5432\n")
        (settings.stack_dir / "tansu.pid").write_text(f"{tansu_like.pid}\n")
        st = stack.up()
        assert st["broker"]["started"] and st["database"]["started"], st
        assert st["broker"]["pid"] != tansu_like.pid and st["database"]["pid"] != pg_like.pid
        stack.down()
        assert pg_like.poll() is None and tansu_like.poll() is None
    finally:
        pg_like.kill()
        tansu_like.kill()
        pg_like.wait()
        tansu_like.wait()


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
