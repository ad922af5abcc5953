from __future__ import annotations

import os
import socket

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from inferlog.config import InferlogSettings


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class WorkerSettings(BaseSettings):
    """The gpu-worker's settings. Environment: ``INFERLOG_WORKER_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="INFERLOG_WORKER_", extra="ignore")

    worker_id: str = Field(default_factory=_default_worker_id, min_length=1, max_length=128)
    """This worker's name in its load hash and on every result."""
    group_id: str | None = None
    """Consumer group of the worker tier (default ``<topic prefix>.gpu-workers``)."""
    model: str | None = None
    """The registered model this worker serves; the registry's default when unset."""
    device: str = "auto"
    """``auto`` (CUDA if available, else CPU), ``cpu`` or ``cuda[:N]``."""
    num_blocks: int = Field(default=128, ge=4)
    """KV cache blocks. Set explicitly: the manager's default takes most of the machine's memory."""
    page_size: int = Field(default=64, ge=4)
    """Tokens per KV block (per layer page)."""
    max_batch_tokens: int = Field(default=512, ge=16)
    """Most tokens (prefill + decode) in one forward pass."""
    max_running: int = Field(default=16, ge=1, le=1024)
    """Most requests admitted (generating) at once."""
    interactive_share: float = Field(default=0.25, ge=0.0, le=0.9)
    """The share of ``max_running`` slots and of the KV cache that batch work never takes (rounded down), so
    interactive requests start at once beside a batch backlog (nothing is preempted)."""
    threads: int | None = Field(default=None, ge=1)
    """torch's intra-op threads for the model; default: the CPUs this process may run on (its affinity,
    which ``taskset`` or a container's cpuset narrows), not the machine's count."""
    session_timeout_ms: int = Field(default=10_000, ge=1_000)
    """Consumer-group session timeout; generation never blocks the heartbeats."""
    heartbeat_interval_ms: int = Field(default=1_000, ge=100)
    """Consumer-group heartbeat interval."""
    load_interval_s: float = Field(default=1.0, gt=0)
    """How often the load hash in Redis is refreshed."""
    load_ttl_s: int = Field(default=10, ge=2)
    """The load hash's TTL: a worker that stops refreshing disappears after this."""
    lease_ttl_ms: int = Field(default=5_000, ge=500)
    """A generation lease lives this long after its holder stops renewing (renewed every third of it)."""
    watch_interval_s: float = Field(default=1.0, gt=0)
    """How often a request leased by another worker is re-checked (terminal yet? lease expired?)."""
    shutdown_grace_s: float = Field(default=30.0, ge=0)
    """On SIGTERM, how long in-flight generations may finish before the worker exits uncommitted."""
    engine_watchdog_s: float = Field(default=120.0, gt=0)
    """No engine step completed for this long while requests are in the engine: the engine hangs, and the
    worker exits (non-zero) for a restart. A step, not a token: a long prefill yields none. Keep it well
    above one loaded step (seconds on two CPU cores)."""
    max_engine_failures: int = Field(default=2, ge=2)
    """A request that was in this many engine failures ends ``failed`` (``engine_error``) with a dead
    letter, so one poison request cannot crash-loop the fleet."""
    test_hooks: str | None = None
    """A module the fault tests name to break the engine on purpose (its ``install(manager)`` is called).
    Never set in production."""
    common: InferlogSettings = Field(default_factory=InferlogSettings)

    @model_validator(mode="after")
    def _consistent(self) -> WorkerSettings:
        if self.heartbeat_interval_ms * 3 > self.session_timeout_ms:
            raise ValueError("INFERLOG_WORKER_HEARTBEAT_INTERVAL_MS must be at most a third of "
                             "INFERLOG_WORKER_SESSION_TIMEOUT_MS; lower the interval or raise the timeout")
        if self.max_batch_tokens > self.num_blocks * self.page_size:
            raise ValueError(f"max_batch_tokens ({self.max_batch_tokens}) exceeds the KV cache "
                             f"({self.num_blocks} blocks x {self.page_size} tokens); increase "
                             "INFERLOG_WORKER_NUM_BLOCKS or decrease INFERLOG_WORKER_MAX_BATCH_TOKENS")
        if self.load_ttl_s <= self.load_interval_s:
            raise ValueError("INFERLOG_WORKER_LOAD_TTL_S must exceed INFERLOG_WORKER_LOAD_INTERVAL_S")
        return self

    @property
    def model_name(self) -> str:
        return self.model or self.common.default_model
