"""The README's commands, run as a user would: the demo on the embedded stack
and the ingest benchmark. Correctness only (exit codes, stored rows, the
figures being present and consistent), never timings."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest

from tests.conftest import free_port

pytestmark = [pytest.mark.integration, pytest.mark.broker]

REPO = Path(__file__).resolve().parents[2]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARTWATCH_")}
    env.update(
        ARTWATCH_DATA_DIR=str(tmp_path / "var"),
        ARTWATCH_BROKER_URL=f"127.0.0.1:{free_port()}",
        ARTWATCH_EMBEDDED_PG_PORT=str(free_port()),
        ARTWATCH_WORKER__METRICS_PORT=str(free_port()),
        ARTWATCH_WORKER__WEB_PORT=str(free_port()),
        **extra,
    )
    return env


def _artwatch(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "artwatch.cli", *args], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=timeout, stdin=subprocess.DEVNULL,
    )


def test_demo_on_embedded_stack_completes_and_cleans_up(tmp_path: Path) -> None:
    env = _env(tmp_path)
    run = _artwatch(["demo", "--events", "600"], env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "demo complete" in run.stderr
    assert "dead letters by reason: invalid_field 2, malformed_json 1" in run.stderr
    assert "rollup_1h" in run.stderr  # the query that shows the stored series
    # The live display's last frame: everything consumed, at a real (non-zero) rate.
    frame = run.stderr[run.stderr.rindex("consumed"):]
    assert re.search(r"consumed\W+603\b", frame), frame[:400]
    rate = re.search(r"events/s\W+([\d,]+)", frame)
    assert rate and int(rate.group(1).replace(",", "")) > 0, frame[:400]
    status = _artwatch(["stack", "status"], env, timeout=60)
    state = json.loads(status.stdout)
    assert not state["broker"]["running"] and not state["database"]["running"], state


def test_demo_leaves_running_what_it_did_not_start(tmp_path: Path) -> None:
    env = _env(tmp_path)
    assert _artwatch(["stack", "up"], env, timeout=120).returncode == 0
    try:
        run = _artwatch(["demo", "--events", "200", "--seconds", "0"], env, timeout=300)
        assert run.returncode == 0 and "stack kept" in run.stderr, run.stderr[-3000:]
        state = json.loads(_artwatch(["stack", "status"], env, timeout=60).stdout)
        assert state["broker"]["running"] and state["database"]["running"], state
    finally:
        _artwatch(["stack", "down"], env, timeout=120)


def _gone(pid: int) -> bool:
    """No such process, or only its zombie (nothing left running)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.2)
    return False


def _demo_until_worker_starts(env: dict[str, str]) -> tuple[subprocess.Popen, int, list[str]]:
    """Start the demo; return it, its worker's pid and its stderr lines so far (still being read)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "artwatch.cli", "demo", "--events", "3000"], cwd=REPO, env=env,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True).start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        found = [m for line in list(lines) if (m := re.search(r"worker starting \(pid (\d+)", line))]
        if found:
            return proc, int(found[0].group(1)), lines
        time.sleep(0.1)
    proc.kill()
    _artwatch(["stack", "down"], env, timeout=60)
    pytest.fail("demo never started its worker:\n" + "".join(lines)[-3000:])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_demo_terminated_stops_its_worker_and_stack(tmp_path: Path, sig: signal.Signals) -> None:
    """A `kill` or a closed terminal cleans up like Ctrl-C: no orphans."""
    env = _env(tmp_path)
    proc, worker_pid, lines = _demo_until_worker_starts(env)
    try:
        proc.send_signal(sig)
        assert proc.wait(timeout=90) == 130, "".join(lines)[-3000:]
        assert _wait_gone(worker_pid, 10), f"worker {worker_pid} outlived the demo"
        state = json.loads(_artwatch(["stack", "status"], env, timeout=60).stdout)
        assert not state["broker"]["running"] and not state["database"]["running"], state
    finally:  # a failure above must not leave the stack behind
        proc.kill()
        _artwatch(["stack", "down"], env, timeout=60)


def test_worker_exits_when_its_parent_is_killed(tmp_path: Path) -> None:
    """SIGKILL gives the demo no chance to clean up; its worker notices and stops on its own."""
    env = _env(tmp_path)
    proc, worker_pid, lines = _demo_until_worker_starts(env)
    try:
        proc.kill()
        proc.wait(timeout=30)
        assert _wait_gone(worker_pid, 30), f"worker {worker_pid} outlived its killed parent"
    finally:
        _artwatch(["stack", "down"], env, timeout=60)  # the stack is a daemon by design: `stack down` ends it


@pytest.mark.parametrize("workers, storage", [(1, "both"), (2, "memory")])
def test_bench_ingest_prints_figures_with_baselines(tmp_path: Path, timescale_dsn: str, workers: int,
                                                    storage: str) -> None:
    env = _env(tmp_path, ARTWATCH_DATABASE_URL=timescale_dsn)
    run = _artwatch(["bench", "ingest", "--events", "3000", "--rounds", "1", "--workers", str(workers),
                     "--broker-storage", storage, "--json"], env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    for key in ("events", "pipeline_eps", "raw_consume_eps", "ratio", "sink_rows_per_s", "raw_copy_rows_per_s"):
        assert result[key] > 0, key
    assert result["events"] == 3000 and result["rows_verified"] == 3001 and result["workers"] == workers
    per_worker = result["stored_per_worker"]
    assert len(per_worker) == workers and all(n > 0 for n in per_worker) and sum(per_worker) == 3001, per_worker
    assert result["ratio"] == pytest.approx(result["pipeline_eps"] / result["raw_consume_eps"], rel=0.01)
    modes = ["s3", "memory"] if storage == "both" else [storage]
    assert result["broker_storage"] == storage and list(result["storage"]) == modes
    for mode in modes:
        figures = result["storage"][mode]
        assert figures["pipeline_eps"] > 0 and sum(figures["stored_per_worker"]) == 3001, (mode, figures)
    assert result["pipeline_eps"] == result["storage"][modes[0]]["pipeline_eps"]
    if storage == "both":  # what durability costs, against the same run's memory figures
        s3, memory = result["storage"]["s3"], result["storage"]["memory"]
        assert result["s3_vs_memory"]["pipeline_eps"] == pytest.approx(
            s3["pipeline_eps"] / memory["pipeline_eps"], rel=0.01)
    else:
        assert "s3_vs_memory" not in result
    # The bench cleans up after itself: no schema left behind.
    with psycopg.connect(timescale_dsn) as conn:
        left = conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'bench_%'").fetchone()[0]
    assert left == 0
