"""docker-compose.yml and the Dockerfile cannot run here (no Docker engine), so
these checks keep them from drifting from the code: the worker's environment
must be valid settings, the files they copy and mount must exist, and
Prometheus must scrape the port the worker serves on an address it can reach.
And they keep the stack shut: every service restarts by itself, secrets come
from .env (its committed template names them all), and what is published is
bound to the host's 127.0.0.1."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from infra.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_TEXT = (ROOT / "docker-compose.yml").read_text()
COMPOSE = yaml.safe_load(COMPOSE_TEXT)
DOCKERFILE = (ROOT / "Dockerfile").read_text()
SERVICES = COMPOSE["services"]


def _dockerfile_env() -> dict[str, str]:
    return dict(re.findall(r"^ENV (\w+)=(\S+)$", DOCKERFILE, re.M))


def test_worker_environment_is_valid_settings(monkeypatch):
    for k, v in {**_dockerfile_env(), **COMPOSE["services"]["worker"]["environment"]}.items():
        monkeypatch.setenv(k, str(v))
    settings = Settings()
    assert settings.broker_url == "kafka:9092"
    assert settings.dsn() == "postgresql://postgres@timescaledb:5432/artwatch"  # no password in it: PGPASSWORD
    assert COMPOSE["services"]["worker"]["environment"]["PGPASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    # Workers scale with partitions: the topics artwatch creates match the broker's default.
    assert settings.worker.partitions == int(COMPOSE["services"]["kafka"]["environment"]["KAFKA_NUM_PARTITIONS"])
    # Real Kafka has no Tansu join delay; a longer session rides out GC and CPU stalls.
    assert settings.worker.session_timeout_s == 30.0


def test_prometheus_scrapes_the_worker_metrics_port(monkeypatch):
    for k, v in _dockerfile_env().items():
        monkeypatch.setenv(k, v)
    settings = Settings()
    assert settings.worker.metrics_bind == "0.0.0.0", "Prometheus in another container could not reach the worker"
    mounts = COMPOSE["services"]["prometheus"]["volumes"]
    config_path = ROOT / mounts[0].split(":")[0]
    scrape = yaml.safe_load(config_path.read_text())["scrape_configs"][0]["dns_sd_configs"][0]
    assert scrape["names"] == ["worker"] and scrape["port"] == settings.worker.metrics_port
    assert f"EXPOSE {settings.worker.metrics_port}" in DOCKERFILE


@pytest.mark.parametrize("source", re.findall(r"^COPY (.+) \S+$", DOCKERFILE, re.M))
def test_dockerfile_copies_what_exists(source):
    for path in source.split():
        assert (ROOT / path).exists(), path


def test_image_holds_every_package():
    copied = {s.split()[0] for s in re.findall(r"^COPY (\S+) \S+$", DOCKERFILE, re.M)}
    assert {"infra", "streams", "alerts", "models"} <= copied
    assert 'torch==2.13.0' in DOCKERFILE, "the image must pin torch like pyproject does"


def test_every_service_restarts_by_itself():
    """All of them run for good; the worker must (a fatal batch ends it, the restart replays the batch)."""
    assert {name: svc.get("restart") for name, svc in SERVICES.items()} == dict.fromkeys(SERVICES, "unless-stopped")
    assert "worker" in SERVICES


def _env_values() -> list[tuple[str, str, str]]:
    return [(name, key, str(value)) for name, svc in SERVICES.items()
            for key, value in (svc.get("environment") or {}).items()]


def test_no_password_is_written_in_the_compose_file():
    secrets = [(n, k, v) for n, k, v in _env_values() if re.search(r"PASSWORD|SECRET|TOKEN", k)]
    assert {k for _, k, _ in secrets} >= {"POSTGRES_PASSWORD", "PGPASSWORD", "GF_SECURITY_ADMIN_PASSWORD"}
    # Each comes from .env, and compose stops when it is unset or empty (${VAR:?...}).
    assert [(n, k) for n, k, v in secrets if not re.fullmatch(r"\$\{\w+:\?[^}]*\}", v)] == []
    # No user:password@ in any URL.
    assert not re.search(r"://[^/@\s:]+:[^/@\s]+@", COMPOSE_TEXT)


def test_published_ports_are_bound_to_the_hosts_loopback():
    published = {name: svc["ports"] for name, svc in SERVICES.items() if "ports" in svc}
    assert set(published) == {"prometheus", "grafana"}, "Kafka and TimescaleDB must stay on the compose network"
    for name, ports in published.items():
        for port in ports:
            assert isinstance(port, str) and port.startswith("127.0.0.1:") and port.count(":") == 2, (name, port)
    assert "expose" not in SERVICES["kafka"] and "network_mode" not in str(COMPOSE)


def test_env_example_names_every_variable_the_compose_file_uses():
    example = (ROOT / ".env.example").read_text()
    defined = dict(re.findall(r"^(\w+)=(.*)$", example, re.M))
    used = set(re.findall(r"\$\{(\w+)", COMPOSE_TEXT))
    assert used and used == set(defined), (used, set(defined))
    assert all(value == "" for value in defined.values()), "the template must hold no password"
    assert ".env" in (ROOT / ".gitignore").read_text().split(), ".env (the real secrets) must be ignored by git"


def test_image_runs_unprivileged():
    users = re.findall(r"^USER (\S+)$", DOCKERFILE, re.M)
    assert users and users[-1] not in ("root", "0")
