"""The HTTP API's request and response bodies (not the topic records: those are in inferlog.messages)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from inferlog.messages import MAX_REQUEST_ID_LEN, ChatMessage, Priority

REQUEST_ID_PATTERN = r"^[A-Za-z0-9._:~-]+$"
MAX_STOP_SEQUENCES = 4


class SubmitBody(BaseModel):
    """``POST /v1/requests``. Exactly one of ``messages`` and ``prompt``."""

    model_config = ConfigDict(extra="forbid")

    messages: list[ChatMessage] | None = Field(default=None, min_length=1, max_length=1024)
    prompt: str | None = Field(default=None, min_length=1)
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    model: str | None = Field(default=None, max_length=128)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    stop: str | list[str] | None = Field(default=None)
    seed: StrictInt | None = None
    ignore_eos: bool = False
    request_id: str | None = Field(default=None, min_length=1, max_length=MAX_REQUEST_ID_LEN,
                                   pattern=REQUEST_ID_PATTERN)
    session_id: str | None = Field(default=None, min_length=1, max_length=256)
    priority: Priority = Priority.INTERACTIVE
    deadline_s: float | None = Field(default=None, gt=0, le=7 * 24 * 3600, allow_inf_nan=False)

    @field_validator("stop")
    @classmethod
    def _bounded_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        items = [value] if isinstance(value, str) else (value or [])
        if len(items) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(not 1 <= len(item) <= 256 for item in items):
            raise ValueError("each stop sequence must be 1 to 256 characters")
        return value

    @model_validator(mode="after")
    def _one_input(self) -> SubmitBody:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of 'messages' and 'prompt'")
        return self

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class Accepted(BaseModel):
    id: str
    status: str
    status_url: str


class JobResult(BaseModel):
    text: str | None
    finish_reason: str | None
    usage: dict[str, int]


class JobStatus(BaseModel):
    id: str
    object: str = "inferlog.request"
    status: str
    model: str | None
    model_version: str | None
    result: JobResult | None
    error: dict[str, Any] | None
    timings: dict[str, float]
    redrive_of: str | None = None
    """This job re-runs a dead letter of job ``redrive_of`` (``inferlog dlq redrive``)."""
    redriven_as: list[str] = []
    """This job's dead letters were re-run as these jobs, oldest first."""
