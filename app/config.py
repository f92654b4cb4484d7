"""One settings object, read from environment variables.

`DATABASE_URL` is read without a prefix (it is the conventional name); everything
else is `FLEET_*`.  Every default runs: out of the box the service uses a SQLite
file in the working directory.  A `.env` file in the working directory is read too
(the environment wins over it).  Invalid values are explained by app.config_errors.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated, Literal

from limits import parse_many
from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./fleetbridge.db"
# The async drivers the service runs on, by what a URL may name.
DRIVERS = {"sqlite": "sqlite+aiosqlite", "sqlite+aiosqlite": "sqlite+aiosqlite",
           "postgresql": "postgresql+asyncpg", "postgres": "postgresql+asyncpg",
           "postgresql+asyncpg": "postgresql+asyncpg"}
DATABASE_URL_HELP = ("a URL such as sqlite+aiosqlite:///./fleetbridge.db or "
                     "postgresql+asyncpg://user:password@host:5432/fleetbridge")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="FLEET_", extra="ignore", frozen=True, env_file=".env",
        env_file_encoding="utf-8",
    )

    database_url: str = Field(
        default=DEFAULT_DATABASE_URL,
        validation_alias=AliasChoices("DATABASE_URL", "FLEET_DATABASE_URL"),
    )
    # The database: every connect, statement, pool wait and SQLite lock wait gives up
    # after this long and the request answers SERVICE_UNAVAILABLE (app.uow).
    db_timeout_seconds: float = Field(default=10.0, gt=0, le=600)
    db_pool_size: int = Field(default=5, ge=1, le=1_000)
    db_max_overflow: int = Field(default=10, ge=0, le=1_000)

    # Echo every stage change of a tracker-linked job back onto its item.
    tracker_echo: bool = False
    # An item created with this label, or updated to carry it, is ingested as a job in
    # the same unit of work (DESIGN §4, "Tracker → fleet").  Empty disables it.
    auto_ingest_label: str = Field(default="fleet", max_length=100)

    # Leases and the scheduler.
    lease_seconds: int = Field(default=300, ge=5, le=86_400)
    aging_seconds: int = Field(default=600, ge=1)
    retry_backoff_seconds: float = Field(default=30.0, ge=0)
    retry_backoff_max_seconds: float = Field(default=3_600.0, ge=0)
    # The random fraction of each retry backoff: 0.5 is "equal jitter" (a delay in
    # [½·backoff, backoff]), 1 full jitter, 0 none.
    retry_backoff_jitter: float = Field(default=0.5, ge=0, le=1)

    # Background loops (lease reaper, echo sweeper, event retention).
    reaper_interval_seconds: float = Field(default=5.0, gt=0)
    echo_sweep_interval_seconds: float = Field(default=10.0, gt=0)
    echo_sweep_max_backoff_seconds: float = Field(default=300.0, gt=0)
    event_retention_seconds: int = Field(default=7 * 24 * 3_600, ge=60)
    background_loops: bool = True

    # Subscriptions.
    subscriber_queue_size: int = Field(default=1_000, ge=1)
    max_subscriptions_per_connection: int = Field(default=20, ge=1)
    connection_init_timeout_seconds: float = Field(default=10.0, gt=0)
    # How often the hub re-reads the event log for products with live subscribers, in
    # case a publish or a NOTIFY was lost (app.events.hub, app.events.pg_hub).
    hub_poll_seconds: float = Field(default=1.0, gt=0)
    # How long a live stream retries a read while the database is unavailable before
    # it ends with SERVICE_UNAVAILABLE (app.events.retry).
    stream_retry_seconds: float = Field(default=30.0, ge=0)
    # Connections of the small pool that event reads use (hub, streams, entities),
    # apart from the pool that requests use.
    event_pool_size: int = Field(default=3, ge=1, le=100)

    # Tokens (app.auth.guard): how long an instance may reuse a token check, on both
    # stores (revokes invalidate it at once; 0 disables), and how often the tokens of
    # open websockets are re-checked (expiry; revokes on SQLite; lost notifications).
    token_cache_seconds: float = Field(default=5.0, ge=0, le=300)
    token_check_seconds: float = Field(default=1.0, gt=0, le=60)

    # HTTP server.
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65_535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # `text` lines for people, `json` (one object per line) for machines.
    log_format: Literal["text", "json"] = "text"
    graphiql: bool = True
    # Browser origins (scheme://host[:port]) allowed to call /graphql from another
    # origin, comma-separated; empty means same-origin only.  `*` allows any origin.
    cors_origins: Annotated[tuple[str, ...], NoDecode] = ()

    # Bounded cost per client (DESIGN §8; app.http_guard, app.server, app.graphql.guards).
    introspection: bool = True
    max_body_bytes: int = Field(default=1_048_576, ge=1_024)
    max_query_cost: int = Field(default=200_000, ge=1)
    # `limits` strings ("100/second", "6000/minute;200/second"); "" switches one off.
    rate_limit_per_ip: str = "200/second"
    rate_limit_per_token: str = "100/second"
    max_websockets_per_token: int = Field(default=20, ge=1)
    max_subscriptions_per_token: int = Field(default=100, ge=1)
    http_read_timeout_seconds: float = Field(default=30.0, gt=0)
    http_keep_alive_seconds: int = Field(default=5, ge=1)
    # Websockets (app.server): permessage-deflate compresses each frame, at the cost of
    # ~40 KiB of zlib state per connection and a compression per frame and subscriber.
    ws_per_message_deflate: bool = False
    # Websocket keep-alive: a ping this often, and a peer that does not answer within
    # as long is dropped (each ping is a frame and a timer per connection).
    ws_ping_seconds: float = Field(default=20.0, gt=0)
    # The garbage collector of `fleetbridge serve` (app.server.tune_gc): freeze what
    # start-up loaded, and run the youngest generation every this many allocations
    # (0 leaves Python's defaults).
    gc_freeze: bool = True
    gc_threshold: int = Field(default=50_000, ge=0)

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip().rstrip("/") for part in value.split(",") if part.strip())
        return value

    @field_validator("database_url", mode="before")
    @classmethod
    def _known_driver(cls, value: object) -> object:
        """`postgresql://` / `postgres://` / `sqlite://` get the async driver."""
        if not isinstance(value, str):
            return value
        try:
            url = make_url(value)
        except ArgumentError:
            raise ValueError(DATABASE_URL_HELP) from None
        driver = DRIVERS.get(url.drivername)
        if driver is None:
            raise ValueError(DATABASE_URL_HELP)
        if driver == url.drivername:
            return value
        return url.set(drivername=driver).render_as_string(hide_password=False)

    @field_validator("log_level", mode="before")
    @classmethod
    def _any_case(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("rate_limit_per_ip", "rate_limit_per_token")
    @classmethod
    def _rate_limit(cls, value: str) -> str:
        """A `limits` rate string ("100/second", "6000/minute;200/second"), or "" (off)."""
        if value.strip():
            try:
                parse_many(value)
            except ValueError as exc:
                raise ValueError(f"not a rate limit like '100/second': {value!r}") from exc
        return value

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
