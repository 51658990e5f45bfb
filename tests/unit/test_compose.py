"""docker-compose.yml and the Dockerfile cannot run here (no Docker engine), so
these checks keep them from drifting from the code: the worker's environment
must be valid settings, the files they copy and mount must exist, and
Prometheus must scrape the port the worker serves on an address it can reach."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from infra.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _dockerfile_env() -> dict[str, str]:
    return dict(re.findall(r"^ENV (\w+)=(\S+)$", DOCKERFILE, re.M))


def test_worker_environment_is_valid_settings(monkeypatch):
    for k, v in {**_dockerfile_env(), **COMPOSE["services"]["worker"]["environment"]}.items():
        monkeypatch.setenv(k, str(v))
    settings = Settings()
    assert settings.broker_url == "kafka:9092"
    assert settings.dsn().startswith("postgresql://") and "timescaledb:5432" in settings.dsn()
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
