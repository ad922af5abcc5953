from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from inferlog.config import InferlogSettings


class TokenizerSettings(BaseSettings):
    """The tokenizer tier's settings. Environment: ``INFERLOG_TOKENIZER_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="INFERLOG_TOKENIZER_", extra="ignore")

    group_id: str | None = None
    """Consumer group of the tokenizer tier (default ``<topic prefix>.tokenizer``)."""
    max_batch: int = Field(default=256, ge=1, le=10_000)
    """Most records tokenized in one batch."""
    max_max_tokens: int = Field(default=8192, ge=1)
    """The largest ``max_tokens`` accepted from direct producers (the gateway's own bound)."""
    common: InferlogSettings = Field(default_factory=InferlogSettings)
