"""Service configuration: one typed `Settings`, read from `SERVICE_*` environment variables.

Every knob the service has lives here, so that the README's table, the OpenAPI limits and the
code cannot drift apart: the request models read their bounds (`max_k`, `max_exclude`, ...) from
the same object the app was built with. Durations are in seconds (floats) unless the name says
otherwise; Redis timeouts are deliberately tens of milliseconds, not redis-py's 5 s default,
because the cache is an accelerator and a slow cache must cost less than computing the vector.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """All service settings; environment variable = `SERVICE_` + the upper-cased field name."""

    model_config = SettingsConfigDict(env_prefix="SERVICE_", extra="ignore", frozen=True)

    # ---- what to serve -----------------------------------------------------------------
    index_root: Path = Field(
        description="INDEX_ROOT written by `indexer rebuild`; the service serves INDEX_ROOT/current."
    )
    reload_interval_s: float = Field(
        1.0, gt=0, description="How often INDEX_ROOT/current is polled for a new version."
    )

    # ---- request limits ----------------------------------------------------------------
    max_k: int = Field(1000, ge=1, description="Largest `k` a request may ask for.")
    max_exclude: int = Field(10_000, ge=0, description="Most `exclude_item_ids` per request.")
    max_batch: int = Field(64, ge=1, description="Most requests in one POST /retrieve/batch.")
    max_body_bytes: int = Field(
        2 * 1024 * 1024, ge=1024, description="Largest request body; larger ones get a 413."
    )
    max_features: int = Field(256, ge=0, description="Most entries in `features`.")
    max_id_length: int = Field(512, ge=1, description="Longest user or item id accepted.")
    max_history: int = Field(
        100, ge=0, description="Most item ids in a request's `history` (a longer list is a 422 at `body.history`, never cut); "
        "the user tower uses the most recent ones up to the model's history length.",
    )
    max_filter_attributes: int = Field(32, ge=1, description="Most attributes in one request's `filter`.")
    max_filter_values: int = Field(
        1000, ge=1, description="Most values one filter condition may list (`in`, `not_in`, `any`, `all`)."
    )

    # ---- cache ---------------------------------------------------------------------------
    redis_url: str | None = Field(
        None, description="redis://host:port/db, or redis+cluster://host:port (any node of a Redis Cluster); unset = in-process LRU cache."
    )
    cache_ttl_s: int = Field(3600, ge=1, description="Lifetime of a cached user vector.")
    cache_max_entries: int = Field(
        100_000, ge=0, description="Capacity of the in-process LRU cache (0 disables it)."
    )
    cache_prefix: str = Field("tt", description="Prefix of every Redis key.")
    redis_connect_timeout_s: float = Field(0.05, gt=0, description="Redis connect timeout.")
    redis_timeout_s: float = Field(
        0.02,
        gt=0,
        description="Deadline of a Redis reply, counted from the write; a late reply is a cache "
        "error and closes the connection.",
    )
    redis_client: Literal["auto", "builtin", "redis-py"] = Field(
        "auto",
        description="auto: the built-in pipelined client for redis:// URLs (service/redis_client.py), "
        "redis-py for other schemes (rediss://, unix://).",
    )
    redis_max_connections: int = Field(32, ge=1, description="Redis pool size per process (redis-py only).")
    breaker_threshold: int = Field(
        3, ge=1, description="Consecutive Redis errors that open the circuit breaker."
    )
    breaker_cooldown_s: float = Field(
        2.0, gt=0, description="How long an open breaker skips Redis before probing it again."
    )

    # ---- auth ----------------------------------------------------------------------------
    api_key: SecretStr | None = Field(
        None, description="If set, POST endpoints require header X-API-Key with this value."
    )

    # ---- performance -----------------------------------------------------------------------
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads per process (only where torch is loaded; the request path runs numpy).")
    faiss_threads: int = Field(1, ge=1, description="FAISS OpenMP threads per process.")
    hnsw_ef_search: int | None = Field(
        None, ge=1, description="Override the index's HNSW efSearch (default: the manifest's)."
    )
    exact_fallback_max_items: int = Field(
        5_000_000,
        ge=0,
        description="Largest catalog for which an exact scan backs up an ANN index that "
        "returned too few items (k close to the catalog size, many exclusions).",
    )

    gc_freeze: bool = Field(
        True,
        description="gc.freeze() the loaded version after each swap, so full GC passes stay short "
        "(see service/state.py).",
    )

    # ---- logging ---------------------------------------------------------------------------
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "plain"] = Field(
        "json",
        description="json: one JSON object per log line on stderr (under `python -m service.run` "
        "uvicorn's lines too); plain: `time logger level message`, for reading by eye.",
    )
    access_log: bool = Field(True, description="One JSON log line per request.")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings from the environment (read once, on first use)."""
    return Settings()  # type: ignore[call-arg]  # index_root comes from the environment


def settings_table() -> str:
    """The settings as a Markdown table (for the README): `python -m service.settings`."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = "(required)" if field.is_required() else field.default
        if default is None:
            default = "unset"
        rows.append(f"| `SERVICE_{name.upper()}` | `{default}` | {field.description or ''} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(settings_table())
