"""Settings shared by every inferlog process.

Each service builds its own Settings class (``env_prefix`` ``INFERLOG_<SERVICE>_``) once at start-up and
holds an ``InferlogSettings`` for what all of them share: where the broker, Postgres and Redis are, the
topic prefix, and the model registry. Nothing else in the code base reads the environment.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
LOCAL_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
LOCAL_REDIS = "redis://127.0.0.1:6379/0"
EMBEDDED = "embedded"


class ModelSpec(BaseModel):
    """One entry of the model registry: a name clients ask for and where its weights live."""

    name: str = Field(min_length=1, max_length=128)
    """The name clients put in ``model``."""
    path: str | None = None
    """An HF causal-LM directory, or a ``.gguf`` file. None means the bundled SmolLM2, prepared into the cache."""
    gguf_file: str | None = None
    """Where the weights come from when ``path`` is None: a GGUF converted once into an HF directory."""


def _default_models() -> list[ModelSpec]:
    return [ModelSpec(name=DEFAULT_MODEL_NAME)]


class InferlogSettings(BaseSettings):
    """What every inferlog process shares. Environment: ``INFERLOG_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="INFERLOG_", extra="ignore")

    kafka_bootstrap: str = "127.0.0.1:9092"
    """Kafka bootstrap servers, comma separated."""
    topic_prefix: str = Field(default="inferlog", pattern=r"^[A-Za-z0-9._-]{1,100}$")
    """Prefix of every topic name (``<prefix>.requests.v1``); tests use a fresh one per run."""
    topic_partitions: int = Field(default=4, ge=1, le=256)
    """Partition count of the requests, tokenized, events and results topics."""
    broker_check_interval_s: float = Field(default=3.0, gt=0, le=60)
    """How often a consuming service checks that the broker still holds the log it started on (its topics,
    their partition counts, the epoch marker: inferlog.epoch)."""
    redrive_on_up: bool = True
    """``inferlog up`` re-drives, before it serves, every accepted job without a terminal result whose records
    only an earlier broker epoch's log held (the same code as ``inferlog redrive``). Off: ``up`` says how
    many wait, and they hold no admission slot until an operator runs ``inferlog redrive``."""
    postgres_url: str = LOCAL_POSTGRES
    """Postgres DSN of the ledger and result store. Unset: the local one if it answers, else (``inferlog
    up``) an embedded one; ``embedded`` forces that. A configured URL that does not answer is an error."""
    postgres_schema: str = Field(default="inferlog", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    """Database schema holding inferlog's tables; tests use a fresh one per run."""
    redis_url: str = LOCAL_REDIS
    """Redis URL (hot status, notifications, leases, deltas, load). Unset: the local one if it answers,
    else (``inferlog up``) an embedded one; ``embedded`` forces that."""
    redis_prefix: str = Field(default="inferlog", pattern=r"^[A-Za-z0-9._:-]{1,100}$")
    """Prefix of every Redis key."""
    models: list[ModelSpec] = Field(default_factory=_default_models)
    """The model registry, as JSON: ``[{"name": ..., "path": ...}]``. A request for any other model is 404."""
    default_model: str = DEFAULT_MODEL_NAME
    """The model used when a request names none."""
    max_in_flight: int = Field(default=10_000, ge=1)
    """Interactive accepted-but-not-terminal requests above which an interactive submit gets 429."""
    stream_ttl_s: int = Field(default=3600, ge=10)
    """How long a job's live stream (its numbered chunks, in Redis) is kept after its last chunk; a cursor
    (``starting_after``) resumes from it until then, and from the chunk ends kept with the result after."""
    tenant_max_in_flight: int = Field(default=1_000, ge=1)
    """Each tenant's accepted-but-not-terminal requests of one tier above which its submits of that tier get
    429 (``inferlog submit`` feeds a file in as they finish instead)."""
    batch_share: float = Field(default=0.8, gt=0, le=1)
    """The batch tier is refused (``inferlog submit`` waits) once everything in flight, both tiers, reaches
    this share of ``max_in_flight``: batch is shed first."""
    cache_dir: Path = Field(default_factory=lambda: Path.home() / ".cache" / "inferlog")
    """Where prepared (converted) models are kept."""

    @field_validator("models", mode="before")
    @classmethod
    def _parse_models(cls, value: object) -> object:
        if isinstance(value, str):
            return json.loads(value)
        return value

    @model_validator(mode="after")
    def _default_model_is_registered(self) -> InferlogSettings:
        names = [m.name for m in self.models]
        if not names:
            raise ValueError("INFERLOG_MODELS is empty: register at least one model")
        if len(set(names)) != len(names):
            raise ValueError(f"INFERLOG_MODELS has duplicate names: {names}")
        if self.default_model not in names:
            raise ValueError(
                f"INFERLOG_DEFAULT_MODEL={self.default_model!r} is not in INFERLOG_MODELS ({names}); "
                "set INFERLOG_DEFAULT_MODEL to one of them"
            )
        return self
