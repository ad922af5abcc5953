"""From a requests-topic record to what comes next: a tokenized record, or a terminal result for a
request that can never run (and a dead letter for a record that is broken). No broker here."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field

from pydantic import TypeAdapter, ValidationError

from inferlog.errors import InvalidRequest
from inferlog.identity import MAX_JOB_KEY_LEN, job_key
from inferlog.ledger import key_of
from inferlog.messages import (
    SEED_REFUSAL,
    DeadLetter,
    JobKey,
    RequestRecord,
    ResultRecord,
    Status,
    TokenizedRecord,
    dead_letter,
    ended,
    now,
)
from inferlog.models import ModelRegistry
from inferlog.prompting import PromptFormatter, formatter_for


@dataclass(frozen=True)
class RawRecord:
    """A consumed record as this module needs it (so tests need no broker)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass
class Prepared:
    tokenized: list[TokenizedRecord] = field(default_factory=list)
    results: list[ResultRecord] = field(default_factory=list)
    """Terminal outcomes decided here: failed (invalid) or expired."""
    dead: list[DeadLetter] = field(default_factory=list)


class RequestPreparer:
    def __init__(self, registry: ModelRegistry, max_max_tokens: int) -> None:
        self._registry = registry
        self._max_max_tokens = max_max_tokens
        self._formatters: dict[str, tuple[PromptFormatter, int]] = {}

    def _formatter(self, model_name: str) -> tuple[PromptFormatter, int]:
        """UnknownModel / ModelNotReady (this record's failure, never the batch's) when it cannot be served."""
        if model_name not in self._formatters:
            self._formatters[model_name] = formatter_for(self._registry.get(model_name))
        return self._formatters[model_name]

    def parse(self, raws: list[RawRecord]) -> tuple[list[tuple[RawRecord, RequestRecord]], Prepared]:
        """Phase 1: decode each record. The unreadable ones are dead letters (with a failed result for
        their ID, which the caller publishes only if the ID is nobody's job)."""
        out = Prepared()
        parsed = []
        for raw in raws:
            record = self._parse(raw, out)
            if record is not None:
                parsed.append((raw, record))
        return parsed, out

    def prepare_parsed(self, parsed: list[tuple[RawRecord, RequestRecord]], out: Prepared | None = None) -> Prepared:
        """Phase 2: validate and tokenize records that are ours to run. Whatever refuses one record (its
        model unknown or not prepared here, a parameter, the chat template) fails that record alone."""
        out = out or Prepared()
        valid: list[tuple[RequestRecord, str | None]] = []
        at = now()
        for raw, record in parsed:
            if record.deadline_at is not None and record.deadline_at <= at:
                out.results.append(_terminal(record, Status.EXPIRED, "The request's deadline passed before it was "
                                             "tokenized.", code="deadline_exceeded"))
                continue
            try:
                formatter, _context = self._formatter(record.model)
                self._check_params(record)
                rendered = formatter.render(record.messages) if record.messages is not None else None
            except InvalidRequest as exc:
                out.results.append(_failed(record, exc))
                out.dead.append(_dead(raw, str(exc), key_of(record)))
                continue
            valid.append((record, rendered))
        by_model: dict[str, list[tuple[RequestRecord, str | None]]] = defaultdict(list)
        for record, rendered in valid:
            by_model[record.model].append((record, rendered))
        for model_name, records in by_model.items():
            self._tokenize(model_name, records, out, at)
        return out

    def _parse(self, raw: RawRecord, out: Prepared) -> RequestRecord | None:
        try:
            if raw.value is None:
                raise ValueError("the record has no value")
            return RequestRecord.model_validate_json(raw.value)
        except (ValidationError, ValueError) as exc:
            request_id = _request_id_of(raw)
            reason = _describe(exc)
            out.dead.append(_dead(raw, reason, request_id))
            if request_id is not None:  # (a job key: the caller publishes it only if it is nobody's job)
                out.results.append(ended(request_id, Status.FAILED, code="invalid_record",
                                         message=f"The request record is invalid: {reason}"))
            return None

    def _check_params(self, record: RequestRecord) -> None:
        if (record.messages is None) == (record.prompt is None):
            raise InvalidRequest("give exactly one of 'messages' and 'prompt'", param="messages")
        if record.messages is not None and not record.messages:
            raise InvalidRequest("messages must not be empty", param="messages")
        if record.prompt is not None and not record.prompt:
            raise InvalidRequest("prompt must not be empty", param="prompt")
        if record.params.max_tokens > self._max_max_tokens:
            raise InvalidRequest(f"max_tokens is {record.params.max_tokens}; the most allowed is "
                                 f"{self._max_max_tokens}", param="max_tokens")
        if record.params.seed is not None and record.params.temperature > 0:
            raise InvalidRequest(SEED_REFUSAL, param="seed", code="seed_not_supported")

    def _tokenize(self, model_name: str, records: list[tuple[RequestRecord, str | None]], out: Prepared,
                  at: float) -> None:
        formatter, context = self._formatter(model_name)
        chats = [(r, text) for r, text in records if text is not None]
        prompts = [r for r, text in records if text is None]
        encoded = dict(zip((key_of(r) for r, _text in chats),
                           formatter.encode_rendered([text for _r, text in chats]), strict=True))
        encoded.update(zip((key_of(r) for r in prompts),
                           formatter.encode_prompts([r.prompt or "" for r in prompts]), strict=True))
        for record, _text in records:
            ids = encoded[key_of(record)]
            param = "messages" if record.messages is not None else "prompt"
            if not ids:  # (a template that renders nothing): no record can carry an empty prompt
                out.results.append(_failed(record, InvalidRequest("The prompt encodes to no tokens.", param=param)))
                continue
            if len(ids) + record.params.max_tokens > context:
                out.results.append(_failed(record, InvalidRequest(
                    f"The prompt ({len(ids)} tokens) plus max_tokens ({record.params.max_tokens}) exceeds the "
                    f"model's context of {context} tokens.", param=param, code="context_length_exceeded")))
                continue
            out.tokenized.append(TokenizedRecord(
                request_id=key_of(record), model=record.model, input_ids=ids, params=record.params,
                priority=record.priority, session_id=record.session_id, tenant=record.tenant,
                deadline_at=record.deadline_at, timings=record.timings.merged(tokenized_at=at),
            ))


_JOB_KEY: TypeAdapter[str] = TypeAdapter(JobKey)


def _request_id_of(raw: RawRecord) -> str | None:
    """The job key of a broken record (None if it has none a result could carry: NUL, a lone surrogate, too
    long)."""
    key = _key_candidate(raw)
    if key is None:
        return None
    try:
        key.encode("utf-8")
        return _JOB_KEY.validate_python(key)
    except (UnicodeEncodeError, ValidationError):
        return None


def _key_candidate(raw: RawRecord) -> str | None:
    """From the broken record's body's ID and tenant if readable, else its record key."""
    try:
        value = json.loads(raw.value or b"")
        candidate = value.get("request_id") if isinstance(value, dict) else None
        tenant = value.get("tenant") if isinstance(value, dict) else None
        if tenant is not None and not isinstance(tenant, str):
            return None  # no tenant can be named: no key is this record's to fail
        if isinstance(candidate, str) and 0 < len(candidate) <= 128:
            return job_key(tenant, candidate)
    except (ValueError, UnicodeDecodeError):
        pass
    if raw.key:
        key = raw.key.decode("utf-8", "replace")
        return key if len(key) <= MAX_JOB_KEY_LEN + 1 else None
    return None


def _describe(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "record"
        return f"{where}: {first.get('msg')}"
    return str(exc)


def _terminal(record: RequestRecord, status: Status, message: str, *, code: str) -> ResultRecord:
    return ended(key_of(record), status, message=message, code=code, model=record.model, tenant=record.tenant,
                 timings=record.timings)


def _failed(record: RequestRecord, exc: InvalidRequest) -> ResultRecord:
    return ended(key_of(record), Status.FAILED, message=exc.message, code=exc.code, param=exc.param,
                 model=record.model, tenant=record.tenant, finish_reason="error", timings=record.timings)


def _dead(raw: RawRecord, reason: str, request_id: str | None) -> DeadLetter:
    return dead_letter("tokenizer", reason, topic=raw.topic, partition=raw.partition, offset=raw.offset,
                       request_id=request_id, value=raw.value)
