"""A file of requests as ``inferlog submit`` reads it: one JSON object a line, each either an inferlog request
record (``schemas/request.v1.schema.json``) or an OpenAI batch line (``custom_id``, ``method``, ``url``,
``body``), turned into request records with IDs of their own.

IDs are namespaced (DESIGN.md, contract 3): a line's job is ``<namespace>.<custom_id>`` (an inferlog record's
``request_id`` is its custom ID; a record with none is ``<namespace>.~~L<line number>``), so two files'
``custom_id: "1"`` never collide, and the same file submitted again names the same jobs: a re-run submits
nothing twice. The namespace defaults to the file's content hash and holds no ``.``, so where it ends is
never in doubt. A custom ID outside the ID alphabet is escaped (``~`` and two hex digits per UTF-8 byte,
``~`` itself included), and one too long ends in ``~~`` and a digest: ``~~`` never comes out of an escape,
so every derived ID is a valid client ID and distinct custom IDs stay distinct.

Every line is judged alone: a line that is not JSON, neither format, too large, a duplicate custom ID or for
an unregistered model is an error of that line (``LineError``), and the others are still served.
``openai_request`` maps an OpenAI request body to a record; the OpenAI front door reuses it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from inferlog.errors import InvalidRequest
from inferlog.ledger import JobView
from inferlog.messages import (
    MAX_REQUEST_ID_LEN,
    ChatMessage,
    GenerationParams,
    Priority,
    RequestRecord,
    Status,
    Timings,
)

MAX_LINE_BYTES = 1_000_000
"""The largest line taken: the gateway's default body limit (a record's bytes are bounded before any topic)."""
OPENAI_DEFAULT_MAX_TOKENS = 256
OPENAI_URLS = ("/v1/chat/completions", "/v1/completions")
NAMESPACE_PATTERN = re.compile(r"^[A-Za-z0-9_:-]{1,64}$")
_PLAIN = re.compile(r"[A-Za-z0-9._:-]")
_UNSUPPORTED = ("tools", "functions", "tool_choice", "function_call", "logprobs", "top_logprobs", "logit_bias",
                "audio", "modalities", "prediction", "frequency_penalty", "presence_penalty", "echo", "suffix")
"""OpenAI parameters that change the output and are not served: refused per line unless absent or neutral."""


@dataclass(frozen=True)
class LineError:
    code: str
    message: str


@dataclass(frozen=True)
class BatchLine:
    number: int
    """1-based line number in the file."""
    custom_id: str
    """The line's own ID: its ``custom_id``, its ``request_id``, or its line number."""
    openai: bool
    """An OpenAI batch line (its output line is in OpenAI's batch output format)."""
    record: RequestRecord | None = None
    error: LineError | None = None


def namespace_of(data: bytes) -> str:
    """The default namespace of a file: its content's hash (the same file, the same jobs)."""
    return "f" + hashlib.sha256(data).hexdigest()[:16]


def check_namespace(namespace: str) -> str:
    if not NAMESPACE_PATTERN.match(namespace):
        raise InvalidRequest(f"namespace {namespace!r} must be 1-64 of A-Z a-z 0-9 _ : - (no '.': it ends the "
                             "namespace in every job's ID)", param="namespace")
    return namespace


def derived_id(namespace: str, custom_id: str) -> str:
    """``<namespace>.<custom_id>`` as a client ID: characters outside the alphabet escaped as ``~XX`` per UTF-8
    byte (``~`` itself too, so escapes never collide with plain text); past 128 characters, the head and a
    digest of the whole."""
    escaped = "".join(c if _PLAIN.match(c) else "".join(f"~{b:02X}" for b in c.encode("utf-8", "surrogatepass"))
                      for c in custom_id)
    full = f"{namespace}.{escaped}"
    if len(full) <= MAX_REQUEST_ID_LEN:
        return full
    digest = hashlib.sha256(custom_id.encode("utf-8", "surrogatepass")).hexdigest()[:20]
    return f"{full[:MAX_REQUEST_ID_LEN - len(digest) - 2]}~~{digest}"


def read_lines(data: bytes, *, namespace: str, known_models: Iterable[str], default_model: str,
               tenant: str | None = None, priority: Priority | None = None, received_at: float = 0.0,
               max_line_bytes: int = MAX_LINE_BYTES) -> list[BatchLine]:
    """Every non-blank line of the file, judged alone, in file order."""
    models = set(known_models)
    seen: dict[str, int] = {}
    out = []
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark (some editors write one)
        data = data[3:]
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        line = _read_line(number, raw, namespace=namespace, models=models, default_model=default_model,
                          tenant=tenant, priority=priority, received_at=received_at, max_line_bytes=max_line_bytes)
        job = line.record.request_id if line.record is not None else None
        if job is not None and job in seen:
            line = BatchLine(number, line.custom_id, line.openai, error=LineError(
                "duplicate_custom_id", f"custom_id {line.custom_id!r} was already used on line "
                f"{seen[job]}: each line needs its own"))
        elif job is not None:
            seen[job] = number
        out.append(line)
    return out


def _read_line(number: int, raw: bytes, *, namespace: str, models: set[str], default_model: str,
               tenant: str | None, priority: Priority | None, received_at: float,
               max_line_bytes: int) -> BatchLine:
    fallback = str(number)
    if len(raw) > max_line_bytes:
        return BatchLine(number, fallback, False, error=LineError(
            "line_too_large", f"the line is {len(raw):,} bytes; the most taken is {max_line_bytes:,}"))
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        return BatchLine(number, fallback, False, error=LineError("invalid_json", f"the line is not JSON: {exc}"))
    if not isinstance(value, dict):
        return BatchLine(number, fallback, False, error=LineError("invalid_json", "the line is not a JSON object"))
    openai = "body" in value and "custom_id" in value
    custom_id = value.get("custom_id") if openai else value.get("request_id", fallback)
    if not isinstance(custom_id, str) or not custom_id or not _is_utf8(custom_id):
        return BatchLine(number, fallback, openai, error=LineError(
            "invalid_custom_id", "custom_id / request_id must be a non-empty string of valid Unicode"))
    named = openai or "request_id" in value
    request_id = derived_id(namespace, custom_id) if named else f"{namespace}.~~L{number}"
    try:
        if openai:
            record = _openai_line(value, request_id, tenant=tenant, default_model=default_model)
        elif "request_id" in value or "params" in value:
            owner = tenant if tenant is not None else value.get("tenant")  # a record's own tenant, unless told
            record = RequestRecord.model_validate({**value, "request_id": request_id, "tenant": owner})
        else:
            raise InvalidRequest("the line is neither an inferlog request record (request_id, model, params, "
                                 "messages or prompt) nor an OpenAI batch line (custom_id, body)")
    except InvalidRequest as exc:
        return BatchLine(number, custom_id, openai, error=LineError(exc.code or "invalid_value", exc.message))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "the line"
        return BatchLine(number, custom_id, openai, error=LineError("invalid_request", f"{where}: {first['msg']}"))
    if record.model not in models:
        return BatchLine(number, custom_id, openai, error=LineError(
            "model_not_found", f"model {record.model!r} is not registered (registered: {', '.join(sorted(models))})"))
    if (record.messages is None) == (record.prompt is None):
        return BatchLine(number, custom_id, openai, error=LineError(
            "invalid_request", "give exactly one of 'messages' and 'prompt'"))
    try:  # what no record can carry (a lone UTF-16 surrogate in the text) is this line's error, not the run's
        record.model_dump_json()
    except ValueError as exc:
        return BatchLine(number, custom_id, openai, error=LineError("invalid_encoding", f"the line's text cannot "
                                                                    f"be carried: {exc}"))
    update: dict[str, Any] = {"timings": Timings(received_at=received_at)}
    if priority is not None:
        update["priority"] = priority
    return BatchLine(number, custom_id, openai, record=record.model_copy(update=update))


def _openai_line(value: dict[str, Any], request_id: str, *, tenant: str | None, default_model: str) -> RequestRecord:
    url = value.get("url", "/v1/chat/completions")
    if url not in OPENAI_URLS:
        raise InvalidRequest(f"url {url!r} is not served; use one of {', '.join(OPENAI_URLS)}", param="url")
    if value.get("method", "POST") != "POST":
        raise InvalidRequest("method must be POST", param="method")
    body = value["body"]
    if not isinstance(body, dict):
        raise InvalidRequest("body must be a JSON object", param="body")
    return openai_request(body, request_id=request_id, tenant=tenant, default_model=default_model,
                          chat=url == "/v1/chat/completions")


def openai_request(body: dict[str, Any], *, request_id: str, tenant: str | None, default_model: str,
                   chat: bool, priority: Priority = Priority.BATCH) -> RequestRecord:
    """An OpenAI chat completions (``chat``) or completions request body as a request record. Raises
    InvalidRequest (with the ``param``) for what it cannot serve as asked. Where OpenAI has a default that
    changes the output, it is OpenAI's: an absent ``temperature`` samples at 1.0."""
    for name in _UNSUPPORTED:
        if body.get(name) not in (None, False, [], {}, 0, ""):
            raise InvalidRequest(f"{name} is not supported", param=name, code="unsupported_parameter")
    if body.get("best_of") not in (None, 1):
        raise InvalidRequest("only best_of = 1 is supported", param="best_of", code="unsupported_parameter")
    model = body.get("model")
    if model is not None and not (isinstance(model, str) and model):
        raise InvalidRequest("model must be a model's name", param="model")
    for name in ("max_completion_tokens", "max_tokens", "seed", "n"):  # JSON's true is no count
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise InvalidRequest(f"{name} must be an integer", param=name)
    for name in ("temperature", "top_p"):
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise InvalidRequest(f"{name} must be a number", param=name)
    if body.get("response_format") not in (None, {"type": "text"}):
        raise InvalidRequest("only text output is supported", param="response_format", code="unsupported_parameter")
    if body.get("n") not in (None, 1):
        raise InvalidRequest("only n = 1 is supported", param="n", code="unsupported_parameter")
    stop = body.get("stop")
    given = next((k for k in ("max_completion_tokens", "max_tokens") if body.get(k) is not None), None)
    limit = body[given] if given else OPENAI_DEFAULT_MAX_TOKENS
    if limit < 1:
        raise InvalidRequest(f"{given} must be at least 1", param=given)
    params = GenerationParams.model_validate({
        "max_tokens": limit,
        "temperature": 1.0 if body.get("temperature") is None else body["temperature"],
        "top_p": 1.0 if body.get("top_p") is None else body["top_p"],
        "stop": [stop] if isinstance(stop, str) else (stop or []),
        **({"seed": body["seed"]} if body.get("seed") is not None else {}),
    })
    fields: dict[str, Any] = {"request_id": request_id, "model": body.get("model") or default_model,
                              "params": params, "tenant": tenant, "priority": priority}
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequest("messages must be a non-empty list", param="messages")
        fields["messages"] = [_chat_message(m, i) for i, m in enumerate(messages)]
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise InvalidRequest("prompt must be one non-empty string", param="prompt")
        fields["prompt"] = prompt
    return RequestRecord.model_validate(fields)


_RESPONSES_UNSUPPORTED = ("tools", "tool_choice", "reasoning", "prompt", "conversation", "include",
                          "top_logprobs", "max_tool_calls")
"""Responses API parameters that would change the output (or need state) and are not served."""


def responses_request(body: dict[str, Any], *, request_id: str, tenant: str | None, default_model: str,
                      priority: Priority = Priority.INTERACTIVE) -> RequestRecord:
    """An OpenAI Responses API body (``POST /v1/responses``) as a request record, through the chat mapping:
    ``instructions`` is a system message before ``input`` (a string, or messages whose content is a string or
    input/output text parts), ``max_output_tokens`` is ``max_tokens``. ``previous_response_id`` is refused:
    a response's conversation is not kept apart from its job, so the client sends it in ``input``."""
    for name in _RESPONSES_UNSUPPORTED:
        if body.get(name) not in (None, False, [], {}, "", "auto", "none", "disabled"):
            raise InvalidRequest(f"{name} is not supported", param=name, code="unsupported_parameter")
    if body.get("previous_response_id") is not None:
        raise InvalidRequest("previous_response_id is not supported: send the earlier turns in input (a "
                             "response's own messages are the job's, GET /v1/responses/{id})",
                             param="previous_response_id", code="unsupported_parameter")
    text = body.get("text")
    if text not in (None, {}) and text != {"format": {"type": "text"}}:
        raise InvalidRequest("only text output is supported", param="text", code="unsupported_parameter")
    if body.get("truncation") not in (None, "disabled"):
        raise InvalidRequest("only truncation = disabled is supported", param="truncation",
                             code="unsupported_parameter")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise InvalidRequest("instructions must be a string", param="instructions")
    given = body.get("input")
    if isinstance(given, str) and given:
        messages: list[Any] = [{"role": "user", "content": given}]
    elif isinstance(given, list) and given:
        messages = [_response_input_item(item, i) for i, item in enumerate(given)]
    else:
        raise InvalidRequest("input must be a non-empty string or list of messages", param="input")
    if instructions:
        messages = [{"role": "system", "content": instructions}, *messages]
    chat = {"model": body.get("model"), "messages": messages, "max_tokens": body.get("max_output_tokens"),
            "temperature": body.get("temperature"), "top_p": body.get("top_p")}
    try:
        return openai_request(chat, request_id=request_id, tenant=tenant, default_model=default_model, chat=True,
                              priority=priority)
    except InvalidRequest as exc:
        raise as_responses_error(exc, instructions=bool(instructions)) from exc


def as_responses_error(exc: InvalidRequest, *, instructions: bool) -> InvalidRequest:
    """A refusal of the chat mapping naming the Responses API's own params (``max_output_tokens``, and
    ``input.N`` or ``instructions`` for ``messages.N``)."""
    param = exc.param or ""
    if param == "max_tokens":
        param = "max_output_tokens"
    elif param.startswith("messages"):
        parts = param.split(".")
        if len(parts) > 1 and parts[1].isdigit():
            index = int(parts[1]) - instructions
            parts[:2] = ["instructions"] if index < 0 else ["input", str(index)]
        else:
            parts[0] = "input"
        param = ".".join(parts)
    return InvalidRequest(exc.message.replace("max_tokens", "max_output_tokens"), param=param or None,
                          code=exc.code)


def _response_input_item(item: Any, index: int) -> dict[str, Any]:
    """One ``input`` item: a message (``type`` absent or ``message``) with string content or text parts."""
    if not isinstance(item, dict) or item.get("type", "message") != "message":
        raise InvalidRequest(f"input[{index}]: only messages are supported", param=f"input.{index}",
                             code="unsupported_parameter")
    content = item.get("content")
    if isinstance(content, list):
        if any(not isinstance(p, dict) or p.get("type") not in ("input_text", "output_text", "text")
               or not isinstance(p.get("text"), str) for p in content):
            raise InvalidRequest(f"input[{index}]: only text content parts are supported",
                                 param=f"input.{index}.content", code="unsupported_parameter")
        content = [{"type": "text", "text": p["text"]} for p in content]
    return {"role": item.get("role"), "content": content}


RESPONSE_STATUS = {Status.RECEIVED: "queued", Status.QUEUED: "queued", Status.TOKENIZED: "queued",
                   Status.RUNNING: "in_progress", Status.COMPLETED: "completed", Status.FAILED: "failed",
                   Status.CANCELLED: "cancelled", Status.EXPIRED: "incomplete"}
"""inferlog's statuses as the Responses API's: a job whose deadline passed is ``incomplete``, and so is one
that stopped at ``max_output_tokens`` (finish_reason ``length``), as OpenAI reports it."""


def response_object(view: JobView, *, background: bool | None = None) -> dict[str, Any]:
    """A job as OpenAI's ``response`` object. Its ``id`` is the job's ID; its one output item holds the text
    (also while it is partial: an expired job's)."""
    status = RESPONSE_STATUS[view.status]
    incomplete = None
    if view.status is Status.COMPLETED and view.finish_reason == "length":
        status, incomplete = "incomplete", {"reason": "max_output_tokens"}
    elif view.status is Status.EXPIRED:
        incomplete = {"reason": "deadline_exceeded"}
    output = []
    if view.text is not None and view.status in (Status.COMPLETED, Status.EXPIRED):
        output.append(response_message(view, "completed" if status == "completed" else "incomplete"))
    error = None
    if view.status is Status.FAILED:
        error = {"code": str((view.error or {}).get("code") or "server_error"),
                 "message": str((view.error or {}).get("message") or "The job failed.")}
    prompt, completion = view.prompt_tokens or 0, view.completion_tokens or 0
    return {"id": view.client_id, "object": "response",
            "created_at": int(view.timings.get("received_at") or view.timings.get("queued_at") or 0),
            "status": status, "background": background, "model": view.model, "output": output, "error": error,
            "incomplete_details": incomplete, "instructions": None, "metadata": {}, "parallel_tool_calls": False,
            "tool_choice": "none", "tools": [], "text": {"format": {"type": "text"}}, "previous_response_id": None,
            "usage": None if not view.status.is_terminal() else {
                "input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": completion,
                "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": prompt + completion}}


def response_message(view: JobView, status: str, text: str | None = None) -> dict[str, Any]:
    """The response's one output item: an assistant message of one ``output_text`` part."""
    return {"type": "message", "id": f"msg_{view.client_id}", "status": status, "role": "assistant",
            "content": [] if status == "in_progress" else [response_text_part(view.text if text is None else text)]}


def response_text_part(text: str | None) -> dict[str, Any]:
    return {"type": "output_text", "text": text or "", "annotations": [], "logprobs": []}


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _chat_message(message: Any, index: int) -> ChatMessage:
    """One OpenAI chat message: ``developer`` is a system message; content as a string or text parts."""
    if not isinstance(message, dict):
        raise InvalidRequest(f"messages[{index}] must be an object", param=f"messages.{index}")
    role = message.get("role")
    role = "system" if role == "developer" else role
    content = message.get("content")
    if isinstance(content, list):
        if any(not isinstance(p, dict) or p.get("type") != "text" for p in content):
            raise InvalidRequest(f"messages[{index}]: only text content parts are supported",
                                 param=f"messages.{index}.content", code="unsupported_parameter")
        content = "".join(str(p.get("text", "")) for p in content)
    if role not in ("system", "user", "assistant") or not isinstance(content, str):
        raise InvalidRequest(f"messages[{index}] needs a role (system, developer, user, assistant) and text "
                             "content", param=f"messages.{index}")
    return ChatMessage.model_validate({"role": role, "content": content})


def completion_object(view: JobView, *, chat: bool) -> dict[str, Any]:
    """A completed job as OpenAI's ``chat.completion`` (``chat``) or ``text_completion`` object: the other
    direction of ``openai_request``, for the OpenAI routes and the batch output alike. Its ``id`` is the
    job's own ID, so ``chat.completions.retrieve(id)`` (and ``/v1/requests/{id}``) finds the job."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": view.finish_reason, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": view.text, "refusal": None}
    else:
        choice["text"] = view.text
    return {"id": view.client_id,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(view.timings.get("completed_at") or view.timings.get("received_at") or 0),
            "model": view.model, "choices": [choice], "usage": openai_usage(view)}


def openai_usage(view: JobView) -> dict[str, int]:
    prompt, completion = view.prompt_tokens or 0, view.completion_tokens or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
