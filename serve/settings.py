"""Serving settings: defaults, under a YAML file (configs/serve.yaml), under SUPPORTBOT_* variables.

`load_settings()` is the one way to build them. Precedence, strongest first: keyword overrides
(the CLI's --model/--host/--port), environment variables, the YAML file, the defaults below.
Secrets are `SecretStr`, so they never show in a repr, a log line or /docs.

Paths are checked here, once, for every command that loads settings: a `data_dir` that is (or lies
under) a plain file can never be created, and `promote` and `review` failed on it with a
FileExistsError traceback where `chat` happened to report it; now loading the settings refuses it.
"""

from __future__ import annotations

from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from bot import fileio, paths
from bot.errors import SupportbotError
from bot.validation import MAX_MESSAGE_CHARS, describe_validation_errors

from .callbacks import parse_host_entry

DEFAULT_CONFIG = Path("configs/serve.yaml")

# The YAML file of the load in progress; a context variable so concurrent loads cannot mix files.
_yaml_file: ContextVar[Path | None] = ContextVar("supportbot_serve_yaml", default=None)


class SettingsError(SupportbotError):
    """Settings that cannot be used; the message is one line that names the file or variable."""


class Settings(BaseSettings):
    """Everything `supportbot serve` can be told. Env names are SUPPORTBOT_ + the field name in capitals."""

    model_config = SettingsConfigDict(env_prefix="SUPPORTBOT_", extra="forbid", validate_default=True)

    # The names docs/design.md fixes (Settings).
    model: Path | None = Field(None, description="bundle directory to serve")
    data_dir: Path = Field(paths.DEFAULT_DATA_DIR, description="sessions, outbox and caches")
    api_key: SecretStr | None = Field(None, description="when set, /v1/chat, /v1/classify and /v1/sessions need it")
    admin_token: SecretStr | None = Field(None, description="bearer token of POST /v1/admin/reload; unset: reload is off")
    chatwoot_url: str | None = None
    chatwoot_token: SecretStr | None = None
    chatwoot_secret: SecretStr | None = None
    webhook_secret: SecretStr | None = None
    callback_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="hosts the generic webhook may send callbacks to: exact (hooks.example.com, 10.0.0.7) or "
                    "subdomains (.example.com); empty: any host with public addresses",
    )
    session_secret: SecretStr | None = Field(
        None, description="signs the web page's session tokens; unset: one is generated at start (tokens then end "
                          "at a restart, and replicas need one shared secret)",
    )
    session_token_ttl_s: float = Field(
        86400.0, ge=60, le=30 * 86400, description="how long a web session token is valid (renewable while valid)"
    )
    metrics_token: SecretStr | None = Field(
        None, description="when set, GET /metrics needs `Authorization: Bearer TOKEN`; unset: /metrics is open"
    )

    # The shared database (serve/database.py, docs/deployment.md): unset, SQLite files in data_dir.
    database_url: SecretStr | None = Field(
        None, description="postgresql://user:password@host:5432/db shared by every replica; unset: SQLite in data_dir"
    )
    database_pool_size: int = Field(10, ge=1, le=200, description="connections each replica keeps open")
    fleet_poll_s: float = Field(2.0, gt=0, le=60, description="how often a replica checks the promoted model "
                                                              "(PostgreSQL NOTIFY usually tells it at once)")

    # The review queue (bot/review.py, docs/review.md).
    review_corrections: Path | None = Field(
        None, description="the corrections file that labelling in review appends to; unset: data_dir/corrections.yaml")
    review_similarity: float = Field(0.8, gt=0, le=1, description="cosine similarity at which queued messages "
                                                                  "group as near-duplicates")
    review_max_turns: int = Field(20_000, ge=1, le=1_000_000, description="the newest turns the review queue reads")

    # Webhook outbox (serve/outbox.py): replies to Chatwoot and generic callbacks.
    outbox_max_attempts: int | None = Field(
        None, ge=1, le=1_000_000, description="send attempts before an action is given up; unset: the horizon decides"
    )
    outbox_retry_horizon_s: float = Field(
        6 * 3600.0, gt=0, le=30 * 86400, description="how long after queueing a failing send is still retried"
    )
    outbox_lease_s: float = Field(
        60.0, ge=1, le=3600, description="how long a replica owns an action it is sending; a replica that dies "
                                         "mid-send frees it after this (must exceed the send timeout)"
    )
    outbox_backoff_base_s: float = Field(1.0, gt=0, le=3600, description="delay after the first failed attempt")
    outbox_backoff_cap_s: float = Field(300.0, gt=0, le=86400, description="longest delay between attempts")
    outbox_send_timeout_s: float = Field(10.0, gt=0, le=300, description="timeout of one send")
    outbox_concurrency: int = Field(16, ge=1, le=256, description="conversations sent to at once")
    outbox_retention_s: float = Field(
        7 * 86400.0, ge=60, description="how long delivery/message ids (dedupe) and finished actions are kept"
    )

    # Network.
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    trusted_proxies: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="addresses of reverse proxies whose X-Forwarded-For names the client (rate limit, logs); "
                    "empty: the header is ignored and the connection's address is the client",
    )
    max_connections: int = Field(
        1000, ge=1, description="open connections plus requests in progress; beyond it new requests get 503"
    )
    backlog: int = Field(2048, ge=1, description="connections the kernel queues before the server accepts them")
    header_timeout_s: float = Field(
        10.0, gt=0, le=300, description="a connection whose request headers are not complete by then is closed"
    )
    keep_alive_timeout_s: int = Field(5, ge=1, le=300, description="an idle keep-alive connection is closed after it")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="origins allowed to call the API from a browser; empty: no CORS headers"
    )

    # Request batching.
    batch_max_size: int = Field(32, ge=1, le=1024, description="most texts in one forward pass")
    batch_max_wait_ms: float = Field(2.0, ge=0, le=1000, description="how long a batch waits for more requests")
    max_queue: int = Field(2048, ge=1, description="texts waiting for the model before new requests get 503")
    threads: int | None = Field(
        None, ge=1, description="intra-op threads of torch and ONNX Runtime (default: the cores this process may use)"
    )
    backend: Literal["onnx", "torch"] | None = Field(
        None, description="what runs the model: onnx (the bundle's ONNX graph) or torch; default onnx when the bundle has a graph"
    )

    # Protection.
    max_message_chars: int = Field(
        MAX_MESSAGE_CHARS, ge=1, description="longest chat message, classify text or webhook message (bot.validation)"
    )
    max_classify_texts: int = Field(256, ge=1, description="most texts in one /v1/classify request")
    max_body_bytes: int = Field(1_048_576, ge=1024, description="largest request body")
    max_request_chars: int = Field(100_000, ge=1, description="most characters of text in one /v1/classify request")
    max_client_chars: int = Field(
        200_000, ge=1, description="most characters of classify text one client may have waiting for the model")
    bulk_chunk_chars: int = Field(
        4000, ge=1, description="classify texts go to the model in chunks of about this many characters; chat "
                                "and webhook messages go before every chunk")
    rate_limit_per_minute: float = Field(
        120.0, ge=0, description="sustained requests per client address per minute (no API key); 0: off")
    rate_limit_burst: int = Field(30, ge=1, description="requests a client may send at once before the rate applies")
    api_key_rate_limit_per_minute: float = Field(
        6000.0, ge=0, description="sustained requests per minute with the API key (its own bucket); 0: off")
    api_key_rate_limit_burst: int = Field(300, ge=1, description="requests the API key may send at once")
    webhook_rate_limit_per_minute: float = Field(
        1200.0, ge=0, description="sustained deliveries per minute per webhook and sender address; 0: off")
    webhook_rate_limit_burst: int = Field(200, ge=1, description="deliveries a sender may make at once")

    # Logging.
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = True
    log_message_text: bool = Field(False, description="put customer message text in logs (off for privacy)")

    web_page: bool = Field(True, description="serve the web chat page at /")

    @field_validator("cors_origins", "callback_hosts", "trusted_proxies", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        """Accept a YAML list, or a comma-separated string from the environment."""
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("data_dir")
    @classmethod
    def _a_folder(cls, value: Path) -> Path:
        """The folder is created when first used; refused when it, or the nearest existing folder above it, is a file."""
        folder = fileio.nearest_existing(value)
        if not folder.is_dir():
            raise ValueError(f"{folder} exists and is not a folder")
        return value

    @field_validator("callback_hosts")
    @classmethod
    def _canonical_hosts(cls, value: list[str]) -> list[str]:
        """Entries as the callback guard compares them; a scheme, port or path is refused, not ignored."""
        return [parse_host_entry(host) for host in value]

    @model_validator(mode="after")
    def _lease_outlasts_a_send(self) -> Settings:
        if self.outbox_lease_s <= self.outbox_send_timeout_s:
            raise ValueError(f"outbox_lease_s ({self.outbox_lease_s:g}) must be longer than outbox_send_timeout_s "
                             f"({self.outbox_send_timeout_s:g}), or a slow send would be taken over by another replica")
        return self

    @model_validator(mode="after")
    def _a_full_request_fits_the_queue(self) -> Settings:
        # a classify request is admitted to the model queue whole or refused (serve.batching.submit_all)
        if self.max_queue < self.max_classify_texts:
            raise ValueError(f"max_queue ({self.max_queue}) must be at least max_classify_texts "
                             f"({self.max_classify_texts}), or a full /v1/classify request could never be admitted")
        return self

    @field_validator("metrics_token", "session_secret", "database_url", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        """An empty SUPPORTBOT_METRICS_TOKEN (a compose file's `${TOKEN:-}`) means unset, not "no one gets in"."""
        return None if isinstance(value, str) and not value.strip() else value

    @property
    def sessions_path(self) -> Path:
        return paths.sessions_path(self.data_dir)

    @property
    def corrections_path(self) -> Path:
        return self.review_corrections or self.data_dir / "corrections.yaml"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _YamlSource(settings_cls))


class _YamlSource(PydanticBaseSettingsSource):
    """The YAML file named for the current load; its keys are the field names in lower case."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover - unused
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = _yaml_file.get()
        return read_yaml(path) if path is not None else {}


def read_yaml(path: Path) -> dict[str, Any]:
    """The mapping in a settings YAML file; an empty file is an empty mapping."""
    data = fileio.read_yaml(path, error=SettingsError)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"settings file {path} must hold a mapping of setting: value")
    return data


def load_settings(config: str | Path | None = None, **overrides: Any) -> Settings:
    """Settings from `config` (default configs/serve.yaml when it exists), the environment and `overrides`.

    Overrides that are None are ignored, so CLI options left unset do not hide the YAML or env.
    Raises SettingsError with one line naming the bad setting.
    """
    path: Path | None
    if config is not None:
        path = Path(config)
        if not path.is_file():
            raise SettingsError(f"settings file {path} does not exist")
    else:
        path = DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None
    token = _yaml_file.set(path)
    try:
        return Settings(**{key: value for key, value in overrides.items() if value is not None})
    except ValidationError as exc:
        raise SettingsError(_describe(exc, path)) from None
    finally:
        _yaml_file.reset(token)


def _describe(exc: ValidationError, path: Path | None) -> str:
    where = f" (settings file {path} or SUPPORTBOT_* environment)" if path else " (SUPPORTBOT_* environment)"
    return "invalid settings" + where + ": " + describe_validation_errors(exc, renamed={"extra_forbidden": "unknown setting"})
