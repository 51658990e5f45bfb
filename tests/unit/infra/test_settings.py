"""infra.settings: defaults, ARTWATCH_* environment, rejected combinations, frozen."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from infra.settings import Settings, TopicNames, WorkerSettings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No ARTWATCH_* variable of the caller's shell leaks into these tests."""
    for name in list(os.environ):
        if name.upper().startswith("ARTWATCH_"):
            monkeypatch.delenv(name)


def test_defaults():
    s = Settings()
    assert s.app_id == "artwatch"
    assert s.broker_url == "127.0.0.1:9092"
    assert s.database_url is None
    assert s.data_dir == Path("var")
    assert s.embedded_pg_port == 54329
    assert s.log_level == "INFO"
    assert s.topics == TopicNames()
    assert s.topics.inputs() == {"listings": "listings", "bids": "bids", "sales": "sales", "images": "images"}
    assert (s.topics.alerts, s.topics.deadletter) == ("alerts", "deadletter")
    assert s.worker.batch_size == 4000
    assert s.worker.batch_within_s == 0.25
    assert s.worker.partitions == 4
    assert (s.worker.web_port, s.worker.metrics_port) == (6066, 9464)
    assert s.worker.engine == "batch"
    assert s.worker.sink_retry_max_s == 30.0
    assert s.worker.session_timeout_s == 6.0
    assert s.validation.max_future_skew_s == 300.0
    assert s.validation.max_message_bytes == 1_048_576
    assert s.rules.outlier_multiple == 3.0
    assert s.rules.outlier_window_days == 7.0
    assert s.rules.outlier_min_history == 5
    assert s.rules.outlier_late_grace_s == 60.0
    # no database given: the embedded server's DSN, its password only in the 0600 pgpass file
    assert s.dsn() == f"postgresql://postgres@127.0.0.1:54329/postgres?passfile={s.pg_passfile}"
    assert s.stack_dir == Path("var") / "stack"


def test_environment_prefix_and_nested_sections(monkeypatch):
    monkeypatch.setenv("ARTWATCH_WORKER__BATCH_SIZE", "500")
    monkeypatch.setenv("ARTWATCH_WORKER__ENGINE", "agents")
    monkeypatch.setenv("ARTWATCH_DATABASE_URL", "postgresql://u:pw@db.example:5433/art")
    monkeypatch.setenv("ARTWATCH_BROKER_URL", "broker-1:19092,broker-2:19092")
    monkeypatch.setenv("ARTWATCH_TOPICS__SALES", "sales-v2")
    monkeypatch.setenv("ARTWATCH_VALIDATION__MAX_MESSAGE_BYTES", "2048")
    monkeypatch.setenv("ARTWATCH_RULES__OUTLIER_MULTIPLE", "4.5")
    monkeypatch.setenv("ARTWATCH_DATA_DIR", "/tmp/artwatch-x")
    s = Settings()
    assert s.worker.batch_size == 500
    assert s.worker.engine == "agents"
    assert s.worker.web_port == 6066  # untouched fields of a section keep their defaults
    assert isinstance(s.database_url, SecretStr)
    assert s.dsn() == "postgresql://u:pw@db.example:5433/art"
    assert "pw" not in repr(s) and "pw" not in str(s.database_url)
    assert s.broker_url == "broker-1:19092,broker-2:19092"
    assert s.topics.sales == "sales-v2" and s.topics.bids == "bids"
    assert s.validation.max_message_bytes == 2048
    assert s.rules.outlier_multiple == 4.5
    assert s.data_dir == Path("/tmp/artwatch-x")


def test_lower_case_and_unprefixed_variables(monkeypatch):
    monkeypatch.setenv("BATCH_SIZE", "7")  # no prefix: not ours
    monkeypatch.setenv("DATABASE_URL", "postgresql://elsewhere/db")
    monkeypatch.setenv("WORKER__BATCH_SIZE", "7")
    s = Settings()
    assert s.worker.batch_size == 4000
    assert s.database_url is None


def test_unknown_artwatch_variables_are_ignored(monkeypatch):
    monkeypatch.setenv("ARTWATCH_REQUIRE_SERVICES", "1")  # a test-harness switch, not a setting
    assert Settings().app_id == "artwatch"


def test_explicit_arguments_beat_the_environment(monkeypatch):
    monkeypatch.setenv("ARTWATCH_APP_ID", "from-env")
    assert Settings(app_id="given").app_id == "given"
    assert Settings().app_id == "from-env"


def test_invalid_value_from_the_environment_is_rejected(monkeypatch):
    monkeypatch.setenv("ARTWATCH_WORKER__BATCH_SIZE", "0")
    with pytest.raises(ValidationError, match="batch_size"):
        Settings()
    monkeypatch.setenv("ARTWATCH_WORKER__BATCH_SIZE", "many")
    with pytest.raises(ValidationError, match="batch_size"):
        Settings()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"worker": {"metrics_port": 7000, "web_port": 7000}}, "must differ"),
        ({"worker": {"metrics_port": 6066}}, "must differ"),  # against the default web port
        ({"broker_url": "localhost"}, "host:port"),
        ({"broker_url": ""}, "host:port"),
        ({"broker_url": "kafka,other:9092"}, "host:port"),
        ({"worker": {"batch_size": 0}}, "batch_size"),
        ({"worker": {"batch_size": -5}}, "batch_size"),
        ({"worker": {"batch_size": 100_001}}, "batch_size"),
        ({"worker": {"batch_within_s": 0}}, "batch_within_s"),
        ({"worker": {"partitions": 0}}, "partitions"),
        ({"worker": {"web_port": 0}}, "web_port"),
        ({"worker": {"web_port": 70000}}, "web_port"),
        ({"worker": {"engine": "threads"}}, "engine"),
        ({"worker": {"sink_retry_max_s": 0}}, "sink_retry_max_s"),
        ({"worker": {"no_such_field": 1}}, "no_such_field"),
        ({"topics": {"trades": "trades"}}, "trades"),
        ({"validation": {"max_message_bytes": 0}}, "max_message_bytes"),
        ({"validation": {"max_future_skew_s": -1}}, "max_future_skew_s"),
        ({"rules": {"outlier_multiple": 1.0}}, "outlier_multiple"),
        ({"rules": {"outlier_min_history": 0}}, "outlier_min_history"),
        ({"rules": {"outlier_late_grace_s": -1}}, "outlier_late_grace_s"),
        ({"embedded_pg_port": 0}, "embedded_pg_port"),
        ({"broker_url": "127.0.0.1:abc"}, "host:port"),
        ({"broker_url": "127.0.0.1:99999"}, "ports 1-65535"),
        ({"broker_url": ":9092"}, "host:port"),
        ({"worker": {"metrics_port": 54329}}, "embedded_pg_port and worker.metrics_port must differ"),
        ({"broker_url": "localhost:6066"}, "worker.web_port and broker_url's port must differ"),
        ({"log_level": "chatty"}, "log_level"),
        ({"worker": {"session_timeout_s": 0.5}}, "session_timeout_s"),
    ],
)
def test_invalid_combinations_are_rejected(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        Settings(**kwargs)


def test_lenient_where_nothing_clashes():
    assert Settings(log_level="debug").log_level == "DEBUG"
    # A remote broker's port is not ours to clash with.
    assert Settings(broker_url="kafka.internal:6066").broker_url == "kafka.internal:6066"
    assert Settings(broker_url="k1:9092, k2:9093").broker_url == "k1:9092, k2:9093"


def test_metrics_port_zero_disables_the_port_check():
    s = Settings(worker={"metrics_port": 0, "web_port": 6066})
    assert s.worker.metrics_port == 0


def test_port_clash_from_the_environment(monkeypatch):
    monkeypatch.setenv("ARTWATCH_WORKER__WEB_PORT", "9464")
    with pytest.raises(ValidationError, match="must differ"):
        Settings()


def test_settings_are_frozen():
    s = Settings()
    with pytest.raises(ValidationError):
        s.app_id = "other"
    with pytest.raises(ValidationError):
        s.worker.batch_size = 1
    with pytest.raises(ValidationError):
        s.topics.sales = "x"
    with pytest.raises(ValidationError):
        s.validation.max_message_bytes = 1
    assert s.app_id == "artwatch" and s.worker.batch_size == 4000


def test_copies_are_new_objects_and_sections_are_values():
    s = Settings()
    t = s.model_copy(update={"app_id": "b"})  # (model_copy does not validate: only for known-good values)
    assert (s.app_id, t.app_id) == ("artwatch", "b")
    # sections are hashable values (frozen), usable as keys, equal by content
    assert hash(WorkerSettings()) == hash(WorkerSettings())
    assert WorkerSettings(batch_size=7) != WorkerSettings()
