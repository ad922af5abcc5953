from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from inferlog.config import InferlogSettings


class StoreSettings(BaseSettings):
    """The result-store's settings. Environment: ``INFERLOG_STORE_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="INFERLOG_STORE_", extra="ignore")

    group_id: str | None = None
    """Consumer group of the result-store (default ``<topic prefix>.result-store``)."""
    max_batch: int = Field(default=500, ge=1, le=10_000)
    """Most records applied in one Postgres transaction."""
    common: InferlogSettings = Field(default_factory=InferlogSettings)
