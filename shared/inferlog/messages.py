"""The records on inferlog's topics: the contract between stages and with outside producers.

Every record carries ``schema_version``. Within a version only optional fields are added; a breaking change
is a new version (and new topic names, ``*.v2``) running beside the old one. ``schemas/`` holds the JSON
Schema exported from these models (``inferlog schemas``), checked against them by a test.
"""

from __future__ import annotations

import hashlib
import time
from enum import StrEnum
from typing import Annotated, Literal, NamedTuple

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from inferlog.identity import CLIENT_ID_PATTERN, MAX_JOB_KEY_LEN

SCHEMA_VERSION: Literal[1] = 1
MAX_REQUEST_ID_LEN = 128


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain the NUL character (U+0000): no stage can store it")
    return value


Text = Annotated[str, AfterValidator(_no_nul)]
"""A string no stage may be unable to store: NUL-free (Postgres text cannot hold NUL). Generated text is the
one exception (``ResultRecord.text``), stored escaped."""
Name = Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_no_nul)]
"""An identifier-like string: a model, a session, a worker; bounded (some are indexed)."""
JobKey = Annotated[str, Field(min_length=1, max_length=MAX_JOB_KEY_LEN + 1), AfterValidator(_no_nul)]
Stamp = Annotated[float, Field(allow_inf_nan=False)]


def now() -> float:
    """Wall-clock time as every timing field stores it: Unix seconds."""
    return time.time()


class Status(StrEnum):
    """A request's life. It only moves forward; the last four are terminal and final."""

    RECEIVED = "received"
    QUEUED = "queued"
    TOKENIZED = "tokenized"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    def is_terminal(self) -> bool:
        return self in _TERMINAL

    @property
    def rank(self) -> int:
        """Order along the life; every terminal status shares the top rank, so the first one wins."""
        return _RANK[self]


_TERMINAL = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED, Status.EXPIRED})
_RANK = {
    Status.RECEIVED: 0,
    Status.QUEUED: 1,
    Status.TOKENIZED: 2,
    Status.RUNNING: 3,
    **{s: 100 for s in _TERMINAL},
}
TERMINAL_RANK = 100
"""The rank every terminal status shares, in Python and in SQL alike (``status_rank < TERMINAL_RANK``
is an open job)."""


FinishReason = Literal["stop", "length", "cancelled", "expired", "error"]


class Priority(StrEnum):
    INTERACTIVE = "interactive"
    BATCH = "batch"


class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class ChatMessage(_Record):
    role: Literal["system", "user", "assistant"]
    content: Text = Field(max_length=1_000_000)


class Timings(_Record):
    """One definition of a request's timestamps (Unix seconds), filled in stage by stage."""

    received_at: Stamp | None = None
    queued_at: Stamp | None = None
    tokenized_at: Stamp | None = None
    admitted_at: Stamp | None = None
    first_token_at: Stamp | None = None
    completed_at: Stamp | None = None

    def merged(self, **stamps: float | None) -> Timings:
        return self.model_copy(update={k: v for k, v in stamps.items() if v is not None})


SEED_REFUSAL = ("seed is honoured only with temperature 0 (where it changes nothing): the continuous-batching "
                "engine samples every request of a batch from one generator, so a per-request seed cannot make "
                "sampled output reproducible. Omit seed, or use temperature 0.")
"""The one seed policy (docs/decisions.md): the gateway answers it as a 400 (``param: seed``), the tokenizer
as a dead letter and a ``failed`` result for a direct record."""


class GenerationParams(_Record):
    """How to generate. Ranges are checked by the gateway and again by the tokenizer (direct producers)."""

    max_tokens: int = Field(ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0, allow_inf_nan=False)
    """0 is greedy decoding (the default, so the same request gives the same answer)."""
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    stop: list[Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_no_nul)]] = Field(
        default_factory=list, max_length=4)
    """Each 1-256 characters: an empty stop sequence would end every generation at once."""
    seed: int | None = None
    """Accepted only with temperature 0 (see SEED_REFUSAL)."""
    ignore_eos: bool = False
    """Generate exactly ``max_tokens`` tokens (benchmarks and fault tests), as vLLM's ``ignore_eos``."""


class RequestRecord(_Record):
    """``<prefix>.requests.v1``, key: the job key: a job as submitted (by the gateway or a direct producer).

    ``request_id`` is the client's own ID, unique within its ``tenant`` (absent: the default tenant): what the
    client polls by, so of the alphabet a URL path segment carries as is (no ``/``)."""

    schema_version: Literal[1] = SCHEMA_VERSION
    request_id: Text = Field(min_length=1, max_length=MAX_REQUEST_ID_LEN, pattern=CLIENT_ID_PATTERN)
    model: Name
    messages: list[ChatMessage] | None = Field(default=None, repr=False)
    prompt: Text | None = Field(default=None, max_length=1_000_000, repr=False)
    params: GenerationParams
    priority: Priority = Priority.INTERACTIVE
    session_id: Name | None = None
    tenant: str | None = Field(default=None, min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]+$")
    """The job's tenant (absent: the default tenant); ``request_id`` is unique within it."""
    deadline_at: Stamp | None = None
    """Absolute deadline (Unix seconds); past it any stage ends the request ``expired``."""
    timings: Timings = Field(default_factory=Timings)


class DispatchFacts(NamedTuple):
    """What the ledger says of a request before a worker attempts it."""

    terminal: Status | None
    """Its stored terminal status, if it has one."""
    engine_failures: int = 0
    """How many engine failures it was in (strikes)."""
    cancelled: bool = False
    """A cancel was recorded durably (the Redis flag is only the fast path)."""


class TokenizedRecord(_Record):
    """``<prefix>.tokenized.{interactive,batch}.v1``, key ``request_id``: ready for a worker.

    From here on (tokenized, events, results, dead letters) ``request_id`` is the job key
    (``inferlog.identity.job_key``): the client's ID for the default tenant, ``<tenant>/<id>`` otherwise."""

    schema_version: Literal[1] = SCHEMA_VERSION
    request_id: JobKey
    model: Name
    input_ids: list[int] = Field(repr=False, min_length=1)
    params: GenerationParams
    priority: Priority = Priority.INTERACTIVE
    session_id: Name | None = None
    tenant: Name | None = None
    deadline_at: Stamp | None = None
    timings: Timings = Field(default_factory=Timings)


class EventRecord(_Record):
    """``<prefix>.events.v1``, key ``request_id``: a status transition, with the timings so far."""

    schema_version: Literal[1] = SCHEMA_VERSION
    request_id: JobKey
    status: Status
    stage: Literal["gateway", "tokenizer", "gpu-worker", "result-store"]
    at: Stamp = Field(default_factory=now)
    timings: Timings = Field(default_factory=Timings)
    worker_id: Name | None = None


class Usage(_Record):
    prompt_tokens: int = Field(default=0, ge=0)
    completion_tokens: int = Field(default=0, ge=0)


class ErrorInfo(_Record):
    """Why a request failed, in words a person can act on; ``code`` is machine-readable."""

    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None


class ResultRecord(_Record):
    """``<prefix>.results.v1``, key ``request_id``: the terminal outcome. The store keeps the first one."""

    schema_version: Literal[1] = SCHEMA_VERSION
    request_id: JobKey
    status: Status
    model: Name | None = None
    model_version: Name | None = None
    text: str | None = Field(default=None, repr=False)
    """The generated text, whatever its characters (NUL included: the store keeps it escaped)."""
    finish_reason: FinishReason | None = None
    usage: Usage = Field(default_factory=Usage)
    error: ErrorInfo | None = None
    timings: Timings = Field(default_factory=Timings)
    worker_id: Name | None = None
    tenant: Name | None = None
    chunks: list[Annotated[int, Field(ge=0, le=2**31 - 1)]] | None = Field(default=None, repr=False)
    """Where the streamed chunks of ``text`` ended: chunk N (the worker's sequence number N, from 1) is
    ``text[chunks[N-2]:chunks[N-1]]``, so a stream cursor (``starting_after=N``) stays valid after the live
    stream is gone. Absent when nothing was streamed: the whole text is then chunk 1."""
    attempt: Name | None = None
    """The attempt whose chunks ``chunks`` numbers (the stream entries' ``a``): a stream reader that sent another
    attempt's chunks (a takeover that sampled other text) must not join this result's to them."""

    @field_validator("status")
    @classmethod
    def _terminal(cls, status: Status) -> Status:
        # A non-terminal "result" would be stored first-writer-wins: the job would show it forever and every
        # worker's terminal check would skip the job forever.
        if not status.is_terminal():
            raise ValueError(f"a result's status must be terminal, not {status.value!r}")
        return status


DEAD_LETTER_VALUE_CHARS = 16_384
"""How much of the original record a dead letter keeps (its length and hash say the rest): a dead letter
must fit where the original may not (a record over the broker's size limit)."""


class DeadLetter(_Record):
    """``<prefix>.dlq.v1``: a record that can never succeed, with where it came from and why."""

    schema_version: Literal[1] = SCHEMA_VERSION
    stage: str
    error: str
    topic: str
    partition: int
    offset: int
    request_id: str | None = None
    value: str = Field(repr=False)
    """The original record's bytes, decoded as UTF-8 with replacement; at most ``DEAD_LETTER_VALUE_CHARS``
    of them (``truncated`` says when it is a prefix)."""
    at: float = Field(default_factory=now)
    value_bytes: int | None = None
    """The original record's size in bytes."""
    value_sha256: str | None = None
    """The SHA-256 of the original record's bytes (hex), to match it against the log."""
    truncated: bool = False


FINISH_STATUS: dict[str, Status] = {
    "stop": Status.COMPLETED, "length": Status.COMPLETED, "cancelled": Status.CANCELLED,
    "expired": Status.EXPIRED, "error": Status.FAILED,
}
"""How a generation's finish reason ends its request."""


def ended(request_id: str, status: Status, *, message: str | None = None, code: str | None = None,
          error_type: str = "invalid_request_error", param: str | None = None, model: str | None = None,
          tenant: str | None = None, worker_id: str | None = None, timings: Timings | None = None,
          finish_reason: FinishReason | None = None, text: str | None = None) -> ResultRecord:
    """A terminal result decided by a stage rather than generated: refused, failed, cancelled, expired.
    ``message``/``code`` make its error (in words a person can act on); timings get ``completed_at``."""
    assert status.is_terminal(), status
    error = ErrorInfo(message=message, type=error_type, code=code, param=param) if message is not None else None
    return ResultRecord(request_id=request_id, status=status, model=model, tenant=tenant, worker_id=worker_id,
                        error=error, finish_reason=finish_reason, text=text,
                        timings=(timings or Timings()).merged(completed_at=now()))


def _printable(text: str) -> str:
    """Any str as a record can carry it (a lone surrogate becomes U+FFFD)."""
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def dead_letter(stage: str, error: str, *, topic: str, partition: int, offset: int, request_id: str | None,
                value: bytes | str | None) -> DeadLetter:
    """A record that can never succeed, set aside with where it came from and why."""
    raw = value if isinstance(value, bytes) else (value or "").encode("utf-8", "surrogatepass")
    full = raw.decode("utf-8", "replace")
    text, truncated = full[:DEAD_LETTER_VALUE_CHARS], len(full) > DEAD_LETTER_VALUE_CHARS
    return DeadLetter(stage=stage, error=_printable(error)[:2000], topic=topic, partition=partition, offset=offset,
                      request_id=_printable(request_id)[:MAX_JOB_KEY_LEN + 1] if request_id else request_id, value=text,
                      value_bytes=len(raw), value_sha256=hashlib.sha256(raw).hexdigest(), truncated=truncated)


EXPORTED_MODELS: dict[str, type[BaseModel]] = {
    "request.v1": RequestRecord,
    "tokenized.v1": TokenizedRecord,
    "event.v1": EventRecord,
    "result.v1": ResultRecord,
    "dlq.v1": DeadLetter,
}
