"""From request bytes to a RequestRecord: parse, validate, count prompt tokens. No I/O beyond the model's
tokenizer files, no torch."""

from __future__ import annotations

import json
import logging
import re
import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from inferlog.errors import InvalidRequest, ModelNotReady
from inferlog.ledger import request_hash
from inferlog.messages import SEED_REFUSAL, GenerationParams, RequestRecord, Timings, now
from inferlog.models import ModelRegistry, RegisteredModel
from inferlog.prompting import PromptFormatter, formatter_for
from inferlog_gateway.api import REQUEST_ID_PATTERN, SubmitBody
from inferlog_gateway.settings import GatewaySettings

_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Submission:
    record: RequestRecord
    prompt_tokens: int
    sent_hash: str
    """``request_hash`` of what the client sent: the idempotency check's notion of "the same request"."""
    keyed: bool
    """The client named the job (``request_id`` or ``Idempotency-Key``), so a retry can find it."""


def parse_json(raw: bytes) -> Any:
    """The body as JSON, or a 400 that says what is wrong with it."""
    if not raw:
        raise InvalidRequest("The request body is empty; send a JSON object.", code="invalid_json")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"The body is not valid UTF-8 (byte {exc.start}).", code="invalid_encoding") from exc
    try:
        value = json.loads(text)
        nul = _has_nul(value)
    except RecursionError as exc:  # nested deeper than any request: refused, never a 500
        raise InvalidRequest("The body is nested too deeply.", code="invalid_json") from exc
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"The body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}.",
                             code="invalid_json") from exc
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise InvalidRequest(f"The body is not usable JSON: {exc}.", code="invalid_json") from exc
    if nul:
        raise InvalidRequest("The body contains a NUL character (\\u0000), which no text field can hold.",
                             code="invalid_encoding")
    try:  # JSON escapes can smuggle in lone surrogates, which no UTF-8 record can carry
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequest("The body contains a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape).",
                             code="invalid_encoding") from exc
    if not isinstance(value, dict):
        raise InvalidRequest("The body must be a JSON object.", code="invalid_json")
    return value


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


class Intake:
    """Validates submits against the model registry and each model's tokenizer and context length."""

    def __init__(self, registry: ModelRegistry, settings: GatewaySettings) -> None:
        self._registry = registry
        self._settings = settings
        self._formatters: dict[str, tuple[PromptFormatter, int]] = {}

    def preload(self) -> None:
        """Read every prepared model's files at start-up; one that cannot be read is refused per request
        (404 ``model_not_ready``), not a gateway that will not start."""
        for model in self._registry:
            if model.is_prepared:
                try:
                    self.load(model)
                except ModelNotReady as exc:
                    log.warning("%s", exc.message)

    def load(self, model: RegisteredModel) -> None:
        """Read a model's tokenizer and context length (done at start-up for every prepared model); raises
        ModelNotReady when its files cannot be read."""
        self._formatters[model.name] = formatter_for(model)

    def _formatter(self, model: RegisteredModel) -> tuple[PromptFormatter, int]:
        if model.name not in self._formatters:
            self.load(model)
        return self._formatters[model.name]

    def build(self, payload: dict[str, Any], idempotency_key: str | None,
              tenant: str | None = None) -> Submission:
        """The record to claim and produce, and what else the submit needs. Raises InvalidRequest (4xx)."""
        body = SubmitBody.model_validate(payload)
        if body.seed is not None and body.temperature > 0:
            raise InvalidRequest(SEED_REFUSAL, param="seed", code="seed_not_supported")  # the one seed policy
        request_id = body.request_id or idempotency_key or uuid.uuid4().hex
        if not _REQUEST_ID.match(request_id) or len(request_id) > 128:
            raise InvalidRequest("Idempotency-Key must be 1-128 characters of A-Z a-z 0-9 . _ : ~ -",
                                 param="Idempotency-Key")
        model = self._registry.get(body.model)
        prompt_tokens, max_tokens = self._sized(model, body.messages, body.prompt, body.max_tokens)
        received_at = now()
        try:
            params = GenerationParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                      stop=body.stop_list(), seed=body.seed, ignore_eos=body.ignore_eos)
        except ValidationError as exc:  # the API bounds are the record's; this only guards their drift
            raise InvalidRequest(str(exc.errors()[0]["msg"]), param=str(exc.errors()[0]["loc"][0])) from exc
        record = RequestRecord(
            request_id=request_id,
            model=model.name,
            messages=body.messages,
            prompt=body.prompt,
            params=params,
            priority=body.priority,
            session_id=body.session_id,
            tenant=tenant,
            deadline_at=received_at + body.deadline_s if body.deadline_s else None,
            timings=Timings(received_at=received_at),
        )
        sent = body.model_dump(mode="json", exclude_unset=True)  # as sent, normalised (0 and 0.0 alike)
        return Submission(record, prompt_tokens, request_hash(sent, tenant),
                          keyed=bool(body.request_id or idempotency_key))

    def checked(self, record: RequestRecord, *, max_tokens_given: bool) -> tuple[RequestRecord, int]:
        """A record built by another mapping (the OpenAI routes: ``inferlog.batchfile.openai_request``)
        checked as a submit is: model registered and prepared, prompt within the context, ``max_tokens``
        bounded (when not given, what the context leaves, up to the default). Returns the record to claim
        (model named, ``received_at`` stamped) and its prompt tokens. Raises InvalidRequest (4xx)."""
        model = self._registry.get(record.model)
        prompt_tokens, max_tokens = self._sized(model, record.messages, record.prompt,
                                                record.params.max_tokens if max_tokens_given else None)
        params = record.params.model_copy(update={"max_tokens": max_tokens})
        return record.model_copy(update={"model": model.name, "params": params,
                                         "timings": Timings(received_at=now())}), prompt_tokens

    def _sized(self, model: RegisteredModel, messages: list[Any] | None, prompt: str | None,
               max_tokens: int | None) -> tuple[int, int]:
        """The prompt's tokens, and ``max_tokens`` (defaulted to what the context leaves, up to the
        default), once both fit the model. Raises InvalidRequest naming the param."""
        formatter, context = self._formatter(model)
        if messages is not None:
            prompt_tokens = len(formatter.encode_chats([messages])[0])
            prompt_param = "messages"
        else:
            assert prompt is not None
            prompt_tokens = len(formatter.encode_prompts([prompt])[0])
            prompt_param = "prompt"
        if prompt_tokens == 0:
            raise InvalidRequest("The prompt encodes to no tokens.", param=prompt_param)
        room = context - prompt_tokens
        if room < 1:
            raise InvalidRequest(
                f"The prompt is {prompt_tokens} tokens; model {model.name!r} has a context of {context} tokens "
                "and needs room for at least one generated token. Shorten the prompt.",
                param=prompt_param, code="context_length_exceeded")
        max_tokens = max_tokens or min(self._settings.default_max_tokens, room)
        if max_tokens > self._settings.max_max_tokens:
            raise InvalidRequest(f"max_tokens is {max_tokens}; the most allowed is {self._settings.max_max_tokens}.",
                                 param="max_tokens")
        if max_tokens > room:
            raise InvalidRequest(
                f"The prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds the model's context "
                f"of {context} tokens; lower max_tokens to at most {room} or shorten the prompt.",
                param="max_tokens", code="context_length_exceeded")
        return prompt_tokens, max_tokens
