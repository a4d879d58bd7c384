"""Settings: environment (AGENTD_*), then `.env`, then secrets in $CREDENTIALS_DIRECTORY, then
the `--config` TOML file, then defaults. Typed and validated once, at start.

A bad value is reported as one line naming the setting (`ConfigError`); the CLI turns it into
exit status 2. Nothing else in agentd parses settings.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

ENV_PREFIX = "AGENTD_"
#: The model asked for when an endpoint is configured without AGENTD_LLM_MODEL.
DEFAULT_LLM_MODEL = "gpt-4o-mini"
SECRET_FIELDS = ("api_keys", "jwt_secret", "llm_api_key")
DEFAULT_SYSTEM_PROMPT = (
    "You are agentd's assistant. Answer clearly and concisely. You can use tools: "
    "`calculator` for arithmetic, `current_time` for the date and time, and "
    "`search_knowledge_base` to find passages in the user's documents. Use a tool when it "
    "gives a more reliable answer than memory, and say where facts came from."
)


class ConfigError(Exception):
    """One line naming the bad setting."""


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class _TomlSource(PydanticBaseSettingsSource):
    """Keys of the `--config` file: the setting names, lower-case, without the prefix."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path | None) -> None:
        super().__init__(settings_cls)
        self._data: dict[str, Any] = {}
        if path is not None:
            try:
                with path.open("rb") as f:
                    self._data = tomllib.load(f)
            except OSError as e:
                raise ConfigError(f"--config {path}: cannot read: {e.strerror}") from None
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"--config {path}: not valid TOML: {e}") from None
            unknown = sorted(set(self._data) - set(settings_cls.model_fields))
            if unknown:
                raise ConfigError(f"--config {path}: unknown setting {unknown[0]!r}")

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        extra="ignore",
        case_sensitive=False,
        validate_default=True,
        # Sources other than the environment (TOML, credentials) use the field names, also
        # for the settings whose environment names have aliases (OPENAI_*).
        populate_by_name=True,
    )

    data_dir: Path = Path("./var")
    bind: str = "127.0.0.1:8000"
    database_url: str | None = None
    redis_url: str | None = None
    qdrant_url: str | None = None

    llm_base_url: str | None = Field(
        None, validation_alias=AliasChoices("AGENTD_LLM_BASE_URL", "OPENAI_BASE_URL")
    )
    llm_api_key: str | None = Field(
        None, validation_alias=AliasChoices("AGENTD_LLM_API_KEY", "OPENAI_API_KEY")
    )
    llm_model: str | None = None
    llm_timeout: float = Field(60.0, gt=0, le=3600)
    llm_max_retries: int = Field(3, ge=0, le=20)
    llm_fallback_base_url: str | None = None
    llm_fallback_model: str | None = None
    llm_temperature: float | None = Field(None, ge=0, le=2)
    llm_max_connections: int = Field(100, ge=1, le=10000)
    system_prompt: str = DEFAULT_SYSTEM_PROMPT

    embedding_model: str | None = None
    embedding_device: Literal["auto", "cpu", "cuda"] = "auto"

    shutdown_timeout: float = Field(30.0, gt=0, le=3600)
    shutdown_reserve: float | None = Field(None, gt=0)
    web_workers: int = Field(1, ge=1, le=64)
    agent_workers: int = Field(1, ge=1, le=64)

    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    jwt_secret: str | None = None
    rate_limit: str | None = None
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    trusted_proxies: Annotated[list[str], NoDecode] = Field(default_factory=list)

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"

    run_timeout: float = Field(120.0, gt=0, le=86400)
    agent_max_iterations: int = Field(10, ge=1, le=100)
    max_concurrent_runs: int = Field(50, ge=1, le=100000)
    max_queued_runs: int = Field(1000, ge=1, le=10_000_000)
    max_open_streams: int = Field(1000, ge=1, le=100000)
    max_body_bytes: int = Field(1024 * 1024, ge=1024)
    # At most the API models' own limit (app/web/models.py MAX_MESSAGE): a setting can only
    # lower it.
    max_message_chars: int = Field(32000, ge=1, le=32000)
    cache_ttl: float = Field(3600.0, gt=0)
    cache_default: Literal["on", "off"] = "off"
    web_search_url: str | None = None
    event_ttl: float = Field(
        3600.0, gt=0, description="seconds a run's event stream lives after its end"
    )
    watchdog_interval: float = Field(10.0, gt=0, le=600)

    @field_validator("api_keys", "cors_origins", "trusted_proxies", mode="before")
    @classmethod
    def _csv(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("log_level", "log_format", "embedding_device", "cache_default", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("bind")
    @classmethod
    def _bind(cls, value: str) -> str:
        if value.startswith("unix:"):
            return value
        host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("expected HOST:PORT (e.g. 127.0.0.1:8000) or unix:PATH")
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies(cls, value: list[str]) -> list[str]:
        for item in value:
            ipaddress.ip_network(item, strict=False)  # ValueError names the bad entry
        return value

    @field_validator("rate_limit")
    @classmethod
    def _rate(cls, value: str | None) -> str | None:
        if value is not None:
            parse_rate(value)
        return value

    @field_validator("system_prompt")
    @classmethod
    def _prompt(cls, value: str) -> str:
        if value.startswith("@"):
            try:
                return Path(value[1:]).read_text(encoding="utf-8")
            except OSError as e:
                raise ValueError(f"cannot read {value[1:]}: {e.strerror}") from None
        return value

    @model_validator(mode="after")
    def _checks(self) -> Settings:
        if self.shutdown_reserve is not None and self.shutdown_reserve >= self.shutdown_timeout:
            raise ValueError("AGENTD_SHUTDOWN_RESERVE must be below AGENTD_SHUTDOWN_TIMEOUT")
        if not self.auth_enabled and not self.bind_is_loopback:
            raise ValueError(
                f"AGENTD_BIND={self.bind} is not a loopback address and no authentication is "
                "configured: set AGENTD_API_KEYS or AGENTD_JWT_SECRET"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = _TomlSource(settings_cls, _config_path)
        return init_settings, env_settings, dotenv_settings, _CredentialsSource(settings_cls), toml

    # Derived values -----------------------------------------------------------------------

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys) or self.jwt_secret is not None

    @property
    def bind_is_loopback(self) -> bool:
        if self.bind.startswith("unix:"):
            return True
        host = self.bind.rpartition(":")[0].strip("[]")
        if host in ("localhost", ""):
            return host == "localhost"
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    @property
    def reserve(self) -> float:
        """The end of the shutdown budget kept for stopping (API.md: min(5, timeout/3))."""
        if self.shutdown_reserve is not None:
            return self.shutdown_reserve
        return min(5.0, self.shutdown_timeout / 3)

    @property
    def llm_configured(self) -> bool:
        return self.llm_base_url is not None or self.llm_api_key is not None

    @cached_property
    def runtime_dir(self) -> Path:
        return self.data_dir / "run"


class _CredentialsSource(PydanticBaseSettingsSource):
    """Secrets as files in $CREDENTIALS_DIRECTORY (LoadCredential=), named as the variable."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        found: dict[str, Any] = {}
        if not directory:
            return found
        for name in SECRET_FIELDS:
            path = Path(directory) / (ENV_PREFIX + name.upper())
            if path.is_file():
                found[name] = path.read_text(encoding="utf-8").strip()
        return found


_config_path: Path | None = None


def parse_rate(value: str) -> tuple[int, float]:
    """``"120/minute"`` → (120, 60.0)."""
    periods = {
        "second": 1.0,
        "s": 1.0,
        "minute": 60.0,
        "m": 60.0,
        "hour": 3600.0,
        "h": 3600.0,
        "day": 86400.0,
        "d": 86400.0,
    }
    count, sep, period = value.partition("/")
    if not sep or not count.strip().isdigit() or period.strip().lower() not in periods:
        raise ValueError("expected N/second, N/minute, N/hour or N/day (e.g. 120/minute)")
    if int(count) < 1:
        raise ValueError("the count must be at least 1")
    return int(count), periods[period.strip().lower()]


def load(config_file: str | os.PathLike[str] | None = None) -> Settings:
    """Read and validate the settings, or raise `ConfigError` with one line naming the setting."""
    global _config_path
    _config_path = Path(config_file) if config_file is not None else None
    try:
        return Settings()
    except ValidationError as e:
        raise ConfigError(_one_line(e)) from None
    except SettingsError as e:
        raise ConfigError(str(e).split(" from source")[0]) from None
    finally:
        _config_path = None


def _one_line(error: ValidationError) -> str:
    first = error.errors()[0]
    where = first.get("loc") or ()
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if not where:
        return message
    name = ENV_PREFIX + str(where[0]).upper()
    value = first.get("input")
    shown = "" if isinstance(value, dict) or str(where[0]) in SECRET_FIELDS else f"={value!r}"
    return f"invalid setting {name}{shown}: {message}"
