"""Command-line input checks: bad arguments stop at the parser with a message
that names the argument, before anything starts; an unreachable broker is one
clear line, not a kafka-python traceback."""

from __future__ import annotations

import signal

import pytest

from artwatch.cli import _parser, main
from tests.conftest import free_port


@pytest.mark.parametrize(
    "argv, message",
    [
        (["replay", "--speedup", "-1"], "argument --speedup: must be > 0, got -1"),
        (["replay", "--speedup", "0"], "argument --speedup: must be > 0, got 0"),
        (["replay", "--limit", "0"], "argument --limit: must be > 0, got 0"),
        (["replay", "--limit", "ten"], "argument --limit: 'ten' is not a number"),
        (["replay", "--sprite", "/no/such/sprite.png"], "argument --sprite: no such file: /no/such/sprite.png"),
        (["replay", "--start", "2021-01-01T00:00:00"], "needs a time zone"),
        (["demo", "--events", "-5"], "argument --events: must be > 0, got -5"),
        (["demo", "--seconds", "-1"], "argument --seconds: must be >= 0, got -1"),
        (["replay", "--speedup", "nan"], "argument --speedup: must be > 0, got nan"),
        (["bench", "ingest", "--workers", "0"], "argument --workers: must be > 0, got 0"),
        (["bench", "ingest", "--rounds", "0"], "argument --rounds: must be > 0, got 0"),
    ],
)
def test_bad_arguments_are_refused_with_the_reason(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_good_arguments_parse():
    args = _parser().parse_args(["replay", "--speedup", "3600", "--limit", "10", "--start", "2021-01-01T00:00:00Z"])
    assert args.speedup == 3600.0 and args.limit == 10 and args.start.tzinfo is not None


@pytest.fixture
def keep_signal_handlers():
    """main() turns SIGTERM/SIGHUP into KeyboardInterrupt; give pytest its own back."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_replay_without_a_broker_says_how_to_get_one(monkeypatch, capsys, keep_signal_handlers):
    monkeypatch.setenv("ARTWATCH_BROKER_URL", f"127.0.0.1:{free_port()}")  # nothing listens there
    # kafka-python waits 30 s for a broker by default; the message, not the wait, is under test.
    from kafka.admin import KafkaAdminClient

    monkeypatch.setattr(KafkaAdminClient, "DEFAULT_CONFIG", {**KafkaAdminClient.DEFAULT_CONFIG,
                                                             "bootstrap_timeout_ms": 1000})
    assert main(["replay", "--limit", "5"]) == 1
    err = capsys.readouterr().err
    assert "no Kafka broker answers at 127.0.0.1:" in err and "artwatch stack up" in err, err
    assert "Traceback" not in err


def test_an_unreachable_database_is_one_line_with_the_password_masked(monkeypatch, capsys, keep_signal_handlers):
    monkeypatch.setenv("ARTWATCH_DATABASE_URL", f"postgresql://postgres:hunter2@127.0.0.1:{free_port()}/x")
    assert main(["migrate"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("artwatch: cannot use the database at postgresql://postgres:***@127.0.0.1:"), err
    assert "hunter2" not in err and "Traceback" not in err and "artwatch stack up" in err


def test_an_unusable_data_folder_is_one_line(monkeypatch, capsys, tmp_path, keep_signal_handlers):
    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("ARTWATCH_DATA_DIR", str(tmp_path / "afile" / "var"))
    assert main(["stack", "up"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("artwatch: [Errno 20] Not a directory") and "Traceback" not in err, err


def test_eval_detectors_writes_its_report(tmp_path, capsys):
    """The command behind the detectors' evaluation: tuned and reported on
    different seeds, the JSON printed and written (a small subset here)."""
    import json

    out = tmp_path / "report.json"
    assert main(["eval", "detectors", "--json", "--limit", "1800", "--count", "4", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == printed
    for key in ("drift_detected_share", "drift_delay_median", "false_alarms_per_10k", "spurious_alarms_per_10k"):
        assert key in printed and key in printed["detectors"]["baseline"]
    assert printed["default"] in printed["detectors"]


def test_eval_detectors_refuses_to_report_on_its_tuning_seed(capsys):
    assert main(["eval", "detectors", "--seed-tune", "3", "--seed-report", "3"]) == 1
    assert "must differ" in capsys.readouterr().err
