"""The OpenAI front door (issue 12): ``POST /v1/chat/completions`` and ``POST /v1/completions``, plain and
streamed, and ``GET /v1/chat/completions/{id}``.

Each call is a job like a ``/v1/requests`` submit: mapped by the shared ``openai_request`` (the batch file's
mapping), checked by the intake as a submit is, admitted, claimed and produced by the same code, generated and
stored the same way; the handler then waits for the stored result (on the store's notification, never on a
worker), bounded by ``completion_wait_s``. The response's ``id`` is the job's (``X-Request-Id`` too), so
``GET /v1/chat/completions/{id}`` or ``/v1/requests/{id}`` recovers a call whose answer was lost, and the
``Idempotency-Key`` header makes a retry the same job. A wait that runs out answers a 504 carrying the job ID
with ``x-should-retry: false``: the SDK's automatic retry would otherwise start nothing new only if keyed.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from inferlog.batchfile import completion_object, openai_request, openai_usage
from inferlog.errors import InvalidRequest, NotFound, StoreUnavailable
from inferlog.identity import client_id_of, job_key
from inferlog.ledger import JobView, request_hash
from inferlog.messages import SEED_REFUSAL, Priority, Status, now
from inferlog_gateway.intake import parse_json
from inferlog_gateway.jobs import Chunk, JobReader, StreamRestarted
from inferlog_gateway.routes import (
    MAX_WAIT_S,
    _mine,
    _owned,
    _state,
    accept,
    read_body,
    sse,
    sse_response,
    stream_error,
)

router = APIRouter()
log = logging.getLogger(__name__)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, idempotency_key: str | None = Header(default=None)) -> Response:
    return await _call(request, idempotency_key, chat=True)


@router.post("/v1/completions")
async def completions(request: Request, idempotency_key: str | None = Header(default=None)) -> Response:
    return await _call(request, idempotency_key, chat=False)


@router.get("/v1/chat/completions/{request_id}")
async def retrieve_chat_completion(request_id: str, request: Request) -> JSONResponse:
    """The stored completion of a chat call (``client.chat.completions.retrieve(id)``)."""
    state = _state(request)
    tenant = state.keys.tenant_of(request)
    await _owned(state, request_id, tenant)
    job = _mine(await state.jobs.get(job_key(tenant, request_id)), request_id, tenant)
    return _answer(job, chat=True)


async def _call(request: Request, idempotency_key: str | None, *, chat: bool) -> Response:
    state = _state(request)
    tenant = state.keys.tenant_of(request)
    body = parse_json(await read_body(request, state.max_body_bytes))
    stream, include_usage = stream_options(body)
    request_id = call_id(idempotency_key)
    given = any(body.get(k) is not None for k in ("max_tokens", "max_completion_tokens"))
    record = openai_request(body, request_id=request_id, tenant=tenant, default_model=state.registry.default_name,
                            chat=chat, priority=Priority.INTERACTIVE)
    if record.params.seed is not None and record.params.temperature > 0:
        raise InvalidRequest(SEED_REFUSAL, param="seed", code="seed_not_supported")  # the one seed policy
    record, _prompt_tokens = state.intake.checked(record, max_tokens_given=given)
    sent = request_hash({**transport_free(body), "route": "chat" if chat else "completions"}, tenant)
    await accept(state, record, tenant, sent, keyed=idempotency_key is not None)
    key = job_key(tenant, request_id)
    if stream:
        return sse_response(cancelling_if_left(state, key, _chunks(state.jobs, key, record.model, chat=chat,
                                                                   include_usage=include_usage)),
                            headers={"X-Request-Id": request_id})
    read = await read_after_claim(request_id, f"/v1/chat/completions/{request_id}",
                                  wait_for_answer(request, state, key), must_end=True)
    if isinstance(read, JSONResponse):
        return read
    job = read
    return _answer(job, chat=chat)


TRANSPORT_FIELDS = ("stream", "stream_options", "background")
"""Body fields that change how a call is answered, not its job: a keyed retry may differ in them."""


def transport_free(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in TRANSPORT_FIELDS}


async def read_after_claim(request_id: str, fetch: str, read: Awaitable[JobView | None], *,
                           must_end: bool) -> JobView | JSONResponse:
    """The job read after its claim (``read``), or the error to answer instead. From the claim on the job
    exists: every answer carries its ID and ``x-should-retry: false``, so none invites a retry that starts
    another job. ``must_end``: a job not yet terminal is a 504 (the wait ran out; it goes on)."""
    try:
        job = await read
    except StoreUnavailable as exc:
        return error_response(503, request_id, f"The job was accepted; it cannot be read now ({exc}): fetch it "
                              f"with GET {fetch}.", "server_error", "store_unavailable")
    except ClientDisconnect:
        raise
    except Exception:  # noqa: BLE001 - the job exists: answer with its ID, never an invitation to start another
        log.exception("reading %s after its claim failed", request_id)
        return error_response(500, request_id, f"The job was accepted; it could not be read: fetch it with GET "
                              f"{fetch}.", "server_error", "internal_error")
    if job is None or (must_end and not job.status.is_terminal()):
        return error_response(504, request_id, f"The job did not end within the wait; it goes on: fetch it with GET "
                              f"{fetch} or /v1/requests/{request_id}.", "server_error", "completion_wait_exceeded")
    return job


def call_id(idempotency_key: str | None) -> str:
    """The job ID of a call: its ``Idempotency-Key``, or a fresh one."""
    request_id = idempotency_key or uuid.uuid4().hex
    if not 0 < len(request_id) <= 128 or not all(c.isascii() and (c.isalnum() or c in "._:~-") for c in request_id):
        raise InvalidRequest("Idempotency-Key must be 1-128 characters of A-Z a-z 0-9 . _ : ~ -",
                             param="Idempotency-Key")
    return request_id


def stream_options(body: dict[str, Any]) -> tuple[bool, bool]:
    """``stream`` and ``stream_options.include_usage``, strictly typed."""
    stream, options = body.get("stream"), body.get("stream_options")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("stream must be true or false", param="stream")
    if options is not None and not isinstance(options, dict):
        raise InvalidRequest("stream_options must be an object", param="stream_options")
    include_usage = (options or {}).get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise InvalidRequest("stream_options.include_usage must be true or false",
                             param="stream_options.include_usage")
    return bool(stream), bool(include_usage)


async def _chunks(jobs: JobReader, key: str, model: str, *, chat: bool, include_usage: bool) -> AsyncIterator[str]:
    """The job as OpenAI's chunks: one per chunk the worker numbered (its number is the SSE ``id``, the
    cursor ``GET /v1/requests/{id}/stream?starting_after=N`` resumes from), the role in the first, then one
    with the ``finish_reason``, the usage chunk if asked, and ``[DONE]`` once every read of the job answers
    it. A job that ends without completing ends the stream with an error (the SDK raises it)."""
    client_id, first = client_id_of(key), True
    head: dict[str, Any] = {"id": client_id, "object": "chat.completion.chunk" if chat else "text_completion",
                            "created": int(now()), "model": model}

    def chunk(text: str | None, finish_reason: str | None) -> dict[str, Any]:
        nonlocal first
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
        if chat:
            choice["delta"] = ({"role": "assistant"} if first else {}) | ({} if text is None else {"content": text})
        else:
            choice["text"] = text or ""
        first = False
        return {**head, "choices": [choice],
                **({"usage": None} if include_usage else {})}

    job: JobView | None = None
    try:
        async for item in jobs.chunks(key):
            if isinstance(item, Chunk):
                yield sse(chunk(item.text, None), event_id=item.seq)
                continue
            job = item
    except (StreamRestarted, NotFound) as exc:
        yield sse(stream_error(exc))
        return
    assert job is not None, "chunks() ends with the job's terminal view"
    if job.status is not Status.COMPLETED:
        yield sse({"error": _ended(job)["error"]})
        return
    if first:
        yield sse(chunk("", None))
    yield sse(chunk(None, job.finish_reason))
    if include_usage:
        yield sse({**head, "choices": [], "usage": openai_usage(job)})
    yield sse("[DONE]")


def wait_budget(request: Request, configured_s: float) -> float:
    """How long to wait: the setting, and never past the client's own timeout (the Stainless SDKs, OpenAI's
    among them, send it): a client that times out first would retry, and unkeyed, start another job."""
    try:
        client_s = float(request.headers.get("x-stainless-read-timeout", "inf"))
    except ValueError:
        client_s = float("inf")
    return max(0.1, min(configured_s, client_s - 5.0))


async def wait_for_answer(request: Request, state: Any, key: str) -> JobView | None:
    """``wait_for_job`` for a call's answer, bounded by the setting and the client's timeout. With
    ``cancel_on_disconnect``, a client that leaves first cancels the job (nobody is left to answer)."""
    waiting = wait_for_job(state, key, wait_budget(request, state.completion_wait_s))
    if not state.cancel_on_disconnect:
        return await waiting
    answer, gone = asyncio.ensure_future(waiting), asyncio.ensure_future(_left(request))
    left = False
    try:
        await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
        left = not answer.done()
    finally:
        gone.cancel()
        if not answer.done():
            answer.cancel()  # (also when this handler itself is cancelled: no wait outlives it)
    if left:
        await state.jobs.cancel(key)
        raise ClientDisconnect  # the client is gone: nothing to answer
    return answer.result()


async def _left(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


_CANCELS: set[asyncio.Task[Any]] = set()


async def cancelling_if_left(state: Any, key: str, events: AsyncIterator[str]) -> AsyncIterator[str]:
    """A stream's events; with ``cancel_on_disconnect``, a client that leaves before its end cancels the job."""
    ended = False
    try:
        async for event in events:
            yield event
        ended = True
    finally:
        if not ended and state.cancel_on_disconnect:
            task = asyncio.get_running_loop().create_task(state.jobs.cancel(key))
            _CANCELS.add(task)
            task.add_done_callback(_cancel_done)


def _cancel_done(task: asyncio.Task[Any]) -> None:
    _CANCELS.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.warning("cancel of a job whose client left failed: %s", task.exception())


async def wait_for_job(state: Any, key: str, wait_s: float) -> JobView | None:
    """The job once terminal, or as it stands when ``wait_s`` ran out (each wait on the store's
    notification, at most the long-poll's bound)."""
    left, job = wait_s, None
    while left > 0:
        step = min(left, MAX_WAIT_S)
        job = await state.jobs.wait(key, step)
        if job is not None and job.status.is_terminal():
            return job
        left -= step
    return job


def _answer(job: JobView, *, chat: bool) -> JSONResponse:
    if job.status is Status.COMPLETED:
        return JSONResponse(completion_object(job, chat=chat), headers={"X-Request-Id": job.client_id})
    if not job.status.is_terminal():
        return error_response(404, job.client_id, f"The job is still {job.status.value}: its completion is not stored yet "
                      f"(GET /v1/requests/{job.client_id}?wait=30 waits for it).", "invalid_request_error",
                      "not_completed")
    content = _ended(job)
    return JSONResponse(status_code=content.pop("status"), headers={"X-Request-Id": job.client_id,
                                                                     "x-should-retry": "false"}, content=content)


def _ended(job: JobView) -> dict[str, Any]:
    """A job that ended without completing, in OpenAI's error envelope (with its HTTP status, ``status``):
    cancelled and expired are the client's doing (400), a refusal is 400, any other failure 500."""
    if job.status in (Status.CANCELLED, Status.EXPIRED):
        code = "cancelled" if job.status is Status.CANCELLED else "deadline_exceeded"
        return _envelope(400, job.client_id, f"The job ended {job.status.value}.", "invalid_request_error", code)
    error = job.error or {}
    invalid = error.get("type") == "invalid_request_error"
    return _envelope(400 if invalid else 500, job.client_id,
                     str(error.get("message") or f"The job ended {job.status.value}."),
                     "invalid_request_error" if invalid else "server_error", str(error.get("code") or job.status.value),
                     param=error.get("param"))


def _envelope(status: int, request_id: str, message: str, kind: str, code: str,
              param: str | None = None) -> dict[str, Any]:
    return {"status": status, "error": {"message": message, "type": kind, "param": param, "code": code,
                                        "request_id": request_id}}


def error_response(status: int, request_id: str, message: str, kind: str, code: str, param: str | None = None) -> JSONResponse:
    """OpenAI's error envelope, with the job's ID; ``x-should-retry: false`` so the SDK never starts another
    job for an answer this job already has (or will have)."""
    content = _envelope(status, request_id, message, kind, code, param)
    return JSONResponse(status_code=content.pop("status"), content=content,
                        headers={"X-Request-Id": request_id, "x-should-retry": "false"})
