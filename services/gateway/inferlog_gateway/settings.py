from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from inferlog.config import InferlogSettings


class GatewaySettings(BaseSettings):
    """The gateway's settings. Environment: ``INFERLOG_GATEWAY_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="INFERLOG_GATEWAY_", extra="ignore")

    host: str = "127.0.0.1"
    """Address to listen on."""
    port: int = Field(default=8000, ge=1, le=65535)
    """Port to listen on."""
    max_body_bytes: int = Field(default=1_000_000, ge=1_024)
    """Largest request body accepted; larger is 413, refused before it is read whole."""
    completion_wait_s: float = Field(default=300.0, gt=0, le=3600)
    """How long ``POST /v1/chat/completions`` / ``/v1/completions`` wait for their job; past it, a 504 with
    the job ID (``x-should-retry: false``): the job goes on and can be fetched."""
    cancel_on_disconnect: bool = False
    """Whether a client that disconnects from an OpenAI-route call (``/v1/chat/completions``,
    ``/v1/completions``, ``/v1/responses``) before its answer cancels the job. Off: the job goes on, and the
    client fetches it by its ID or resumes its stream."""
    produce_timeout_s: float = Field(default=2.0, gt=0, le=60)
    """How long a submit waits for the broker's acknowledgement; past it the job is accepted anyway and
    left to the outbox relay."""
    outbox_interval_s: float = Field(default=1.0, gt=0, le=60)
    """How often the outbox relay looks for accepted requests the broker has not acknowledged."""
    default_max_tokens: int = Field(default=256, ge=1)
    """``max_tokens`` when a request gives none."""
    max_max_tokens: int = Field(default=8192, ge=1)
    """The largest ``max_tokens`` accepted (also bounded by the model's context)."""
    retry_after_s: int = Field(default=2, ge=1)
    """``Retry-After`` on a 503 while the store or broker is unavailable."""
    api_keys: dict[str, str] = Field(default_factory=dict)
    """API key → tenant, as JSON. Empty: no authentication, one anonymous tenant."""
    common: InferlogSettings = Field(default_factory=InferlogSettings)
