"""The worker's memory stays flat over 100,000 malformed messages (issue 8, point 2).

One real worker (the default batch engine) takes ``MESSAGES`` (100,000)
malformed messages of every category of the flood test (arbitrary bytes,
truncated JSON, invalid UTF-8, nesting thousands deep, bad times, numbers,
fields, text and images, empty values and tombstones), mixed with a few valid
events, in ``WAVES`` (10) equal waves over all four input topics. Most are
small (median 300 bytes, mean 1.3 KB, up to 30 KB); every wave also carries
``HEAVY`` (3) of about a megabyte: 10 bytes over the 1 MiB limit, 50 KB over
it, and just under it but invalid (a 600 KiB inline image on the images
topic), placed on the topics by turns (the placement repeats every 4 waves).

After each wave is fully processed (every valid event stored, every
malformed message one row in ``deadletters``, every dead letter published)
the worker's resident set (``VmRSS``) is read. The first ``WARMUP`` (4) waves
fill what a worker holds by design however long it runs: aiokafka's fetch
buffers (up to 4 MiB a partition, 32 MiB a fetch), the batches prepared and
in flight, a batch's dead letters until the outbox published them, psycopg's
and libpq's buffers, the heap's high-water mark; 4 waves show each heavy
message on each topic once. After that a worker that keeps nothing per
message stays flat, and one that keeps anything per message (a list entry, a
label set, a log record, a ``DeadLetter``) grows by that much times the
messages of the later waves: that is what is bounded (``growth_bound_kib``).
The worker's pid must not change, and its peak stays under ``PEAK_MIB``.

Sizes come from the environment like the other fault tests:
``ARTWATCH_FAULTS_MEMORY_MESSAGES`` (100,000), ``ARTWATCH_FAULTS_MEMORY_WAVES``
(10), ``ARTWATCH_FAULTS_MEMORY_WARMUP`` (4), ``ARTWATCH_FAULTS_MEMORY_HEAVY``
(heavy messages per wave, 3), ``ARTWATCH_FAULTS_MEMORY_VALID`` (valid events
per wave, 200).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import msgspec
import psycopg
import pytest

from tests.faults.helpers import (
    EVENT_TABLES,
    _env_int,
    assert_stored_exactly_once,
    ids_by_kind,
    isolated_settings,
    log_tail,
    produce,
    ready,
    replay_events,
    rng,
    rss_kib,
    summarize,
    wait_drained,
)
from tests.faults.test_malformed_flood import LIMIT, Malformed, _mix

MESSAGES = _env_int("ARTWATCH_FAULTS_MEMORY_MESSAGES", 100_000)
WAVES = _env_int("ARTWATCH_FAULTS_MEMORY_WAVES", 10)
WARMUP = _env_int("ARTWATCH_FAULTS_MEMORY_WARMUP", 4)
HEAVY = _env_int("ARTWATCH_FAULTS_MEMORY_HEAVY", 3)
VALID_PER_WAVE = _env_int("ARTWATCH_FAULTS_MEMORY_VALID", 200)

# The bound on growth after the warm-up, from the smallest leak worth
# catching: one small object kept per malformed message. The least the
# pipeline could keep per message is a list slot (8 bytes) holding a 2-tuple
# (56 bytes), e.g. a (partition, offset) key remembered forever: 64 bytes.
# Anything it really handles per message is bigger (an IncomingMessage tuple
# 104 bytes, a DeadLetter without its value ~120, a log record ~500, the
# value itself 1.3 KB on average here). The later waves carry
# MESSAGES * (WAVES - WARMUP) / WAVES messages (60,000 at the defaults): a
# 64-byte leak adds 3.7 MiB there, the bound; a 100-byte one 5.7 MiB; keeping
# the values 75 MiB. Measured here (2 shared cores), a flat worker moves
# +1.5 to +2.0 MiB over those waves (late high-water marks of the heap; three
# runs, one beside two busy processes); over 300,000 messages in 30 waves it
# ends +1.8 MiB above wave 4 and is flat from wave 10 on (127.5 MiB). A worker
# made to keep a (partition, offset) tuple per dead letter (~96 bytes with
# the int and the list slot) grew +8.4 MiB and failed. With the thresholds set
# by the worker itself (not by the environment before it starts) a flat run
# went up to +3.9 MiB, so the bound is the 96-byte leak's (5.5 MiB): every
# object the pipeline really handles per message is bigger.
LEAK_BYTES_PER_MESSAGE = 96
# A ceiling on the plateau itself: ~95 MiB of a started worker, plus one
# 32 MiB fetch being prepared, two batches in flight (the records and their
# dead letters: 2 x 32 MiB) and the outbox's 100 claimed rows of at most
# 256 KiB (25 MiB); measured: 115-128 MiB after each wave, peak 137 MiB.
PEAK_MIB = 320

# The worker as shipped: it fixes glibc's mmap and trim thresholds at start
# (streams.worker._fix_malloc_thresholds), without which RSS creeps up with
# heap fragmentation for ~80,000 messages (measured: 124 -> 153 MiB, then
# jumps of ~11 MiB at random) though what it holds is flat, far more than a
# small leak would add.

# The worker takes ~1,000-1,300 malformed messages a second on 2 shared cores (~100 s at the defaults).
pytestmark = [pytest.mark.integration, pytest.mark.broker, pytest.mark.timescale,
              pytest.mark.timeout(240 + MESSAGES // 200)]


def _late_messages() -> int:
    return MESSAGES * (WAVES - WARMUP) // WAVES


def growth_bound_kib() -> int:
    """What a leak of LEAK_BYTES_PER_MESSAGE over the later waves would add (KiB)."""
    return LEAK_BYTES_PER_MESSAGE * _late_messages() // 1024


def _status_kib(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _waves(names: dict[str, str]) -> tuple[list[dict[str, list]], list[Counter], dict[str, set[str]]]:
    """Per wave, per input topic: (key, value) messages, malformed ones of
    every category with the valid events scattered among them; per wave the
    valid events of each kind; the ids of all valid events by kind."""
    r = rng("worker-memory")
    events = replay_events(VALID_PER_WAVE * WAVES)
    valid: dict[str, list[list]] = {k: [[] for _ in range(WAVES)] for k in EVENT_TABLES}
    samples: dict[str, list[dict]] = {k: [] for k in EVENT_TABLES}
    for i, (kind, key, rec) in enumerate(events):
        value = msgspec.json.encode(rec)
        valid[kind][i // VALID_PER_WAVE].append((key.encode(), value))
        if len(samples[kind]) < 200:
            samples[kind].append(json.loads(value))
    gens = {k: Malformed(r, k, samples[k]) for k in EVENT_TABLES if samples[k]}
    kinds = sorted(gens)
    per_wave = MESSAGES // WAVES
    out = []
    for w in range(WAVES):
        bad: dict[str, list] = {k: [] for k in kinds}
        # heavy messages, by turns on each topic; heavy() gives just over the
        # limit, far over it and just under it (invalid), in that order
        for h in range(HEAVY):
            kind = kinds[(w * HEAVY + h) % len(kinds)]
            _cat, value = gens[kind].heavy()[h % 3]
            bad[kind].append((r.choice([None, b"k", r.randbytes(8)]), value))
        for i in range(per_wave - HEAVY):
            kind = kinds[i % len(kinds)]
            _cat, value = gens[kind].one()
            key = r.choice([None, b"k", r.randbytes(8)]) if value is not None else b"tombstone"
            bad[kind].append((key, value))
        out.append({names[k]: _mix(r, valid[k][w], bad[k]) for k in kinds})
    counts = [Counter({k: len(valid[k][w]) for k in EVENT_TABLES}) for w in range(WAVES)]
    return out, counts, ids_by_kind(events)


def test_worker_rss_stays_flat_over_100k_malformed_messages(broker, fresh_db, workers, tmp_path) -> None:
    assert WAVES > WARMUP >= 1 and MESSAGES // WAVES > HEAVY
    settings = isolated_settings(broker, fresh_db, tmp_path / "data")
    assert settings.validation.max_message_bytes == LIMIT
    names = settings.topics.inputs()
    t_gen = time.monotonic()
    waves, valid_counts, published = _waves(names)
    t_gen = time.monotonic() - t_gen
    n_bad = sum(1 for wave in waves for items in wave.values() for k, v in items) - sum(map(len, published.values()))
    assert n_bad == MESSAGES // WAVES * WAVES

    worker = ready(workers.start(settings, "worker"))
    pid = worker.proc.pid

    def alive() -> None:
        if not worker.alive() or worker.proc.pid != pid:
            pytest.fail(f"the worker exited (code {worker.proc.returncode}) in the flood\n{log_tail(worker)}")

    samples = [rss_kib(pid)]  # KiB: after start, then after each wave
    timings = []
    expected: Counter = Counter()
    t0 = time.monotonic()
    for w, (wave, valid_of_wave) in enumerate(zip(waves, valid_counts)):
        t_wave = time.monotonic()
        for topic, items in wave.items():
            produce(broker, topic, items)
        t_published = time.monotonic() - t_wave
        alive()
        expected.update(valid_of_wave)
        wait_drained(fresh_db, worker, dict(expected), timeout=300, deadletters=(w + 1) * (MESSAGES // WAVES),
                     alive=alive, stall_s=90)
        with psycopg.connect(fresh_db, autocommit=True) as conn:
            deadline = time.monotonic() + 120
            while conn.execute("SELECT count(*) FROM deadletters WHERE published_at IS NULL").fetchone()[0]:
                alive()
                assert time.monotonic() < deadline, f"dead letters left unpublished\n{log_tail(worker)}"
                time.sleep(0.5)
        alive()
        samples.append(rss_kib(pid))
        timings.append((round(t_published, 1), round(time.monotonic() - t_wave, 1)))
    elapsed = time.monotonic() - t0
    peak = _status_kib(pid, "VmHWM")
    alive()
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        stored_dead = conn.execute("SELECT count(*) FROM deadletters").fetchone()[0]
    assert worker.stop() == 0, f"the worker did not stop cleanly after the flood\n{log_tail(worker)}"

    base = samples[WARMUP]
    growth = samples[-1] - base
    late_max = max(samples[WARMUP:]) - base
    bound = growth_bound_kib()
    summarize("worker memory", (
        f"{stored_dead} dead letters of {MESSAGES} malformed messages (+{sum(map(len, published.values()))} valid) "
        f"in {WAVES} waves, {elapsed:.0f}s (+{t_gen:.0f}s to generate); RSS KiB after start and each wave: "
        f"{samples}; peak {peak}; after the {WARMUP} warm-up waves {growth:+d} KiB (max {late_max:+d}), bound "
        f"{bound} KiB; per wave (published s, done s): {timings}"))
    assert stored_dead == MESSAGES // WAVES * WAVES
    assert_stored_exactly_once(fresh_db, published)
    assert growth <= bound and late_max <= bound, (
        f"the worker's RSS grew {growth} KiB (up to {late_max} KiB) over the {_late_messages()} malformed messages "
        f"after the warm-up, as much as a leak of {LEAK_BYTES_PER_MESSAGE} bytes a message would add ({bound} KiB): "
        f"samples {samples}")
    assert peak is None or peak <= PEAK_MIB * 1024, f"the worker's peak RSS was {peak} KiB, over {PEAK_MIB} MiB"
