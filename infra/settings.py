"""One typed, frozen settings object for every artwatch process.

Built once by the command line (``Settings()`` reads ``ARTWATCH_*`` variables)
and passed down explicitly; no other module reads ``os.environ``. Nested
sections take ``ARTWATCH_<SECTION>__<FIELD>``, e.g. ``ARTWATCH_WORKER__BATCH_SIZE``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings", "TopicNames", "WorkerSettings", "ValidationSettings"]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TopicNames(_Section):
    listings: str = "listings"
    bids: str = "bids"
    sales: str = "sales"
    images: str = "images"
    alerts: str = "alerts"
    deadletter: str = "deadletter"

    def inputs(self) -> dict[str, str]:
        """Map record kind -> topic name for the four market feeds."""
        return {"listings": self.listings, "bids": self.bids, "sales": self.sales, "images": self.images}


class ValidationSettings(_Section):
    # A listing dated a day ahead is a feed bug, not a trade; reject it at the edge.
    max_future_skew_s: float = Field(300.0, gt=0)
    # Images above 512 KiB travel by uri (architecture); 1 MiB leaves room for base64 + JSON.
    max_message_bytes: int = Field(1_048_576, gt=0)
    # An inline image whose header declares more pixels is refused (a 50,000 x
    # 50,000 PNG bomb is ~40 KB); 40 MP is 160 MB as RGBA.
    image_max_pixels: int = Field(40_000_000, gt=0)
    # Image uris: allowed schemes, and hosts ("cdn.example.org" itself,
    # "*.example.org" its subdomains). No hosts: any public DNS name, never an
    # IP literal, localhost or an intranet name (streams/image_checks.py).
    image_uri_schemes: tuple[str, ...] = ("https",)
    image_uri_hosts: tuple[str, ...] = ()

    @field_validator("image_uri_schemes", "image_uri_hosts")
    @classmethod
    def _lower(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        # Schemes and host names compare case-insensitively.
        out = tuple(v.strip().lower() for v in values)
        if not all(out) or any(c in v for v in out for c in ":/@ "):
            raise ValueError(f"entries must be bare schemes or host names (no ':', '/', '@'), got {values}")
        return out


class WorkerSettings(_Section):
    batch_size: int = Field(4000, ge=1, le=100_000)
    batch_within_s: float = Field(0.25, gt=0)
    # Batches committing at once per topic (batch engine); each has its own connection.
    max_in_flight: int = Field(2, ge=1, le=8)
    partitions: int = Field(4, ge=1)
    web_port: int = Field(6066, ge=1, le=65535)
    metrics_port: int = Field(9464, ge=0, le=65535)  # 0: no endpoint
    metrics_bind: str = "127.0.0.1"  # 0.0.0.0 in containers, so Prometheus can scrape
    # batch: fetch-sized batches with manual commits inside the Faust worker
    # (streams/batch_ingest.py explains why); agents: one Faust agent per topic.
    engine: Literal["batch", "agents"] = "batch"
    # How long one store retries transient database errors (backoff capped at
    # sink_retry_backoff_max_s, jittered) before the batch engine takes over:
    # it pauses its partitions, reports degraded and waits on, however long.
    sink_retry_max_s: float = Field(30.0, gt=0)
    sink_retry_backoff_max_s: float = Field(5.0, gt=0)
    # Every wait on the database has a limit: libpq connect (whole seconds, at
    # least 2), each statement, each lock wait. A timeout counts as transient.
    db_connect_timeout_s: int = Field(5, ge=2, le=300)
    db_statement_timeout_s: float = Field(60.0, gt=0)
    db_lock_timeout_s: float = Field(10.0, gt=0)
    # Offset commits and log-end queries; a commit past it is kept for the next one.
    broker_timeout_s: float = Field(30.0, gt=0)
    # One send to the alerts or dead-letter topic and its acknowledgement; past
    # it the message is parked in its table and re-sent later (streams/outbox.py).
    publish_timeout_s: float = Field(30.0, gt=0)
    # Consumer group session (heartbeats every third of it). Tansu admits a
    # joining member only after about half of it, and a worker joins twice
    # (Faust's consumer, then the batch engine's), so it sets the start-up
    # time; 6 s is Kafka's default minimum. Raise it where GC or CPU stalls
    # could outlast it (docker-compose.yml uses 30 s with real Kafka).
    session_timeout_s: float = Field(6.0, ge=1, le=300)


class AlertRuleSettings(_Section):
    outlier_multiple: float = Field(3.0, gt=1)
    outlier_window_days: float = Field(7.0, gt=0)
    outlier_min_history: int = Field(5, ge=1)
    # Sales up to this far behind the newest scored one of their collection
    # count as on time (partitions drift apart by a batch or two).
    outlier_late_grace_s: float = Field(60.0, ge=0)


class Settings(BaseSettings):
    """All configuration; see README's Configuration section for the variables.

    Examples
    --------
    >>> s = Settings(broker_url="127.0.0.1:19092")
    >>> s.broker_url, s.topics.sales, s.worker.batch_size
    ('127.0.0.1:19092', 'sales', 4000)
    """

    model_config = SettingsConfigDict(
        env_prefix="ARTWATCH_", env_nested_delimiter="__", frozen=True, extra="ignore"
    )

    app_id: str = "artwatch"
    broker_url: str = "127.0.0.1:9092"
    # Unset: the embedded stack runs its own PostgreSQL in ``data_dir/pg``.
    database_url: Optional[SecretStr] = None
    data_dir: Path = Path("var")
    embedded_pg_port: int = Field(54329, ge=1, le=65535)
    # The embedded broker's storage: s3 (Tansu over a local SeaweedFS in
    # ``data_dir/stack/s3``, kept across restarts) or memory (lost on restart).
    broker_storage: Literal["s3", "memory"] = "s3"
    # How the worker's start-up migration treats TimescaleDB: auto (use it when
    # installed), on (require it), off (keep plain tables even when installed).
    timescale: Literal["auto", "on", "off"] = "auto"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    topics: TopicNames = TopicNames()
    validation: ValidationSettings = ValidationSettings()
    worker: WorkerSettings = WorkerSettings()
    rules: AlertRuleSettings = AlertRuleSettings()

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check(self) -> "Settings":
        servers = [server.strip().rpartition(":") for server in self.broker_url.split(",")]
        for host, sep, port in servers:
            if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
                raise ValueError(f"broker_url must be host:port[,host:port...] with ports 1-65535,"
                                 f" got {self.broker_url!r}")
        # Ports this machine listens on must differ (a remote broker's may be anything).
        w = self.worker
        ports = {"worker.web_port": w.web_port, "embedded_pg_port": self.embedded_pg_port}
        if w.metrics_port:
            ports["worker.metrics_port"] = w.metrics_port
        host, _, port = servers[0]
        if host.strip("[]") in ("127.0.0.1", "localhost", "::1", "0.0.0.0"):
            ports["broker_url's port"] = int(port)
        clashes = [n for n, p in ports.items() if list(ports.values()).count(p) > 1]
        if clashes:
            raise ValueError(f"{' and '.join(clashes)} must differ (all are {ports[clashes[0]]})")
        return self

    @property
    def stack_dir(self) -> Path:
        return self.data_dir / "stack"

    @property
    def pg_passfile(self) -> Path:
        """The embedded server's password file (pgpass format, 0600), made by the stack."""
        return self.stack_dir.absolute() / "pg.pass"

    def dsn(self) -> str:
        """The database the project uses: the given URL, else the embedded server.

        The embedded server's password stays in its pgpass file: libpq reads
        it through ``passfile``, so the secret is in no DSN, log or process list.

        Examples
        --------
        >>> Settings(data_dir="/srv/a b", database_url=None, embedded_pg_port=54329).dsn()
        'postgresql://postgres@127.0.0.1:54329/postgres?passfile=/srv/a%20b/stack/pg.pass'
        """
        if self.database_url is not None:
            return self.database_url.get_secret_value()
        passfile = quote(str(self.pg_passfile), safe="/")
        return f"postgresql://postgres@127.0.0.1:{self.embedded_pg_port}/postgres?passfile={passfile}"
