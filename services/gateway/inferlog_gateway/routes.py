"""The gateway's HTTP handlers. They read the request, call intake/submitter/ledger, and shape responses."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from redis.exceptions import RedisError

from inferlog.admission import Admission, Overloaded
from inferlog.errors import InvalidRequest, NotFound, StoreUnavailable
from inferlog.hot import WorkerLoads
from inferlog.identity import client_id_of, job_key
from inferlog.ledger import Claim, JobView, RequestLedger
from inferlog.messages import MAX_REQUEST_ID_LEN, RequestRecord, Status
from inferlog.models import ModelRegistry, RegisteredModel
from inferlog.publishing import OutboxRelay, Submitter
from inferlog_gateway.api import Accepted, JobResult, JobStatus
from inferlog_gateway.intake import Intake, parse_json
from inferlog_gateway.jobs import Chunk, JobReader, StreamRestarted, stored_chunks
from inferlog_gateway.tenants import TenantKeys


@dataclass
class GatewayState:
    """What the handlers use, built once in the lifespan."""

    intake: Intake
    submitter: Submitter
    ledger: RequestLedger
    max_body_bytes: int
    broker_ready: object  # async () -> bool
    relay: OutboxRelay
    jobs: JobReader
    admission: Admission
    keys: TenantKeys
    registry: ModelRegistry
    loads: WorkerLoads
    completion_wait_s: float = 300.0
    cancel_on_disconnect: bool = False


router = APIRouter()
MAX_WAIT_S = 60.0


def _state(request: Request) -> GatewayState:
    return request.app.state.gateway  # type: ignore[no-any-return]


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 415 unless JSON and with 413 past ``limit`` (before it is read whole)."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise _HttpError(415, f"Content-Type must be application/json, not {content_type or 'missing'!r}.")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _HttpError(413, f"The body is {declared} bytes; the limit is {limit}.")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _HttpError(413, f"The body exceeds the limit of {limit} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


class _HttpError(InvalidRequest):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message, code={413: "request_too_large", 415: "unsupported_media_type"}[status])
        self.status_code = status


@router.post("/v1/requests", status_code=202)
async def submit(request: Request, idempotency_key: str | None = Header(default=None)) -> JSONResponse:
    state = _state(request)
    tenant = state.keys.tenant_of(request)
    raw = await read_body(request, state.max_body_bytes)
    submission = state.intake.build(parse_json(raw), idempotency_key, tenant)
    record = submission.record
    claim = await accept(state, record, tenant, submission.sent_hash, keyed=submission.keyed)
    status_url = str(request.url_for("get_request", request_id=record.request_id))
    body = Accepted(id=record.request_id, status=claim.status.value, status_url=status_url)
    headers = {"Location": status_url}
    if not claim.created:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(status_code=202, content=body.model_dump(), headers=headers)


async def accept(state: GatewayState, record: RequestRecord, tenant: str | None, sent_hash: str, *,
                 keyed: bool) -> Claim:
    """Take a checked submit, the one way every route does: admit it, then claim and produce it. A keyed
    retry of a job already accepted is answered, not refused: only new work is shed (the lookup is paid only
    on refusal; an admitted submit's claim does the same check in its INSERT)."""
    try:
        await state.admission.admit(tenant, record.priority)
    except Overloaded:
        claim = await state.ledger.existing_claim(record, sent_hash) if keyed else None
        if claim is None:
            raise
        return claim
    claim = await state.submitter.submit(record, sent_hash)
    if claim.created:
        state.admission.accepted(tenant, record.priority)
    return claim


@router.get("/v1/requests/{request_id}", name="get_request")
async def get_request(request_id: str, request: Request,
                      wait: float = Query(default=0, ge=0, le=MAX_WAIT_S)) -> JobStatus:
    """The job's status and result. ``wait`` (seconds) long-polls: it returns as soon as the job is
    terminal, or when the wait ends."""
    state = _state(request)
    tenant = state.keys.tenant_of(request)
    await _owned(state, request_id, tenant)
    job = await state.jobs.wait(job_key(tenant, request_id), wait)
    return job_status(_mine(job, request_id, tenant))


@router.delete("/v1/requests/{request_id}")
async def cancel_request(request_id: str, request: Request) -> JSONResponse:
    """Cancel a job: a queued one never reaches the model, a running one stops within a decode step.
    202 while the cancel travels; 200 with the job as it is if it had already ended."""
    state = _state(request)
    tenant = state.keys.tenant_of(request)
    await _owned(state, request_id, tenant)
    job = await state.jobs.cancel(job_key(tenant, request_id))
    if job is None:
        raise _unknown(request_id)
    status = 200 if job.status.is_terminal() else 202
    return JSONResponse(status_code=status, content=job_status(job).model_dump())


@router.get("/v1/requests/{request_id}/stream")
async def stream_request(request_id: str, request: Request, starting_after: int = Query(default=0, ge=0, le=2**31),
                         attempt: str | None = Query(default=None, max_length=300),
                         last_event_id: str | None = Header(default=None)) -> StreamingResponse:
    """The job's text as Server-Sent Events: a ``delta`` event per chunk the worker numbered (``id:`` and
    ``seq`` are its number, from 1; ``attempt`` says which generation attempt wrote it), then one ``done``
    event with the terminal status, sent only once every read of the job answers it. ``starting_after=N``
    (or ``Last-Event-ID``) resumes after chunk N, on any gateway, from the live stream while Redis keeps it
    and from the stored result after; with ``attempt`` (the last delta's) a resume is checked against a
    takeover that regenerated the text: where the client's chunks are not the stored attempt's, the
    stream ends with an ``error`` event (``stream_restarted``) rather than join two texts."""
    state = _state(request)
    job = await _owned(state, request_id, state.keys.tenant_of(request))
    after = max(starting_after, _event_id(last_event_id))
    await check_cursor(state, job, after, attempt, past_last=0)
    return sse_response(_native_events(state.jobs, job.request_id, after, attempt))


def _event_id(header: str | None) -> int:
    if header is None or header == "":
        return 0
    if not (header.isascii() and header.isdigit() and len(header) <= 10):
        raise InvalidRequest("Last-Event-ID must be a chunk number this stream sent", param="Last-Event-ID")
    return int(header)


async def check_cursor(state: GatewayState, job: JobView, after: int, attempt: str | None, *, past_last: int) -> None:
    """A resume of a job already ended must name a place in its stream: a cursor ``after`` more than
    ``past_last`` events past its last chunk is a 400, never a silent end (unless the cursor is another
    attempt's: its stream then ends with ``stream_restarted``, which says what to do)."""
    if after == 0 or not job.status.is_terminal():
        return
    stored = await state.ledger.get(job.request_id) or job
    if attempt and stored.attempt and attempt != stored.attempt:
        return
    if stored.text and after > chunk_count(stored) + past_last:
        raise InvalidRequest(f"starting_after={after} is past the end of the job's stream", param="starting_after")


def chunk_count(job: JobView) -> int:
    """How many chunks the stored result has (the whole text is one when none were kept)."""
    return len(job.chunks) if job.chunks else len(stored_chunks(job))


async def _native_events(jobs: JobReader, request_id: str, after: int, attempt: str | None) -> AsyncIterator[str]:
    try:
        async for item in jobs.chunks(request_id, after, attempt):
            if isinstance(item, Chunk):
                yield sse({"text": item.text, "seq": item.seq, "attempt": item.attempt}, event="delta",
                          event_id=item.seq)
            else:
                yield sse({"status": item.status.value, "finish_reason": item.finish_reason,
                           "completion_tokens": item.completion_tokens or 0}, event="done")
    except (StreamRestarted, NotFound) as exc:
        yield sse(stream_error(exc), event="error")


def stream_error(exc: StreamRestarted | NotFound) -> dict[str, Any]:
    """Why a stream ends without its end, in the error envelope."""
    if isinstance(exc, NotFound):
        return {"error": {"message": exc.message, "type": "invalid_request_error", "param": None, "code": "not_found"}}
    return {"error": {"message": str(exc), "type": "server_error", "param": None, "code": "stream_restarted"}}


def sse_response(events: AsyncIterator[str], headers: dict[str, str] | None = None) -> StreamingResponse:
    return StreamingResponse(_kept_alive(events), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})


KEEPALIVE_S = 15.0


async def _kept_alive(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """The events, and an SSE comment whenever none came for ``KEEPALIVE_S`` (a job waiting in the queue or
    for the store): proxies and clients with read timeouts keep a healthy stream open."""
    pending: asyncio.Task[str] | None = None
    try:
        while True:
            pending = pending or asyncio.ensure_future(anext(events))
            done, _ = await asyncio.wait({pending}, timeout=KEEPALIVE_S)
            if not done:
                yield ": keep-alive\n\n"
                continue
            try:
                event = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            yield event
    finally:
        if pending is not None and not pending.done():
            pending.cancel()  # the events' own clean-up runs as that step ends
        else:
            await events.aclose()  # type: ignore[attr-defined]


def sse(data: Any, event: str | None = None, event_id: int | None = None) -> str:
    head = (f"event: {event}\n" if event else "") + (f"id: {event_id}\n" if event_id is not None else "")
    return f"{head}data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


@router.get("/v1/requests")
async def list_requests(request: Request, status: Status | None = None, since: float | None = Query(None, ge=0, lt=1e11),
                        limit: int = Query(20, ge=1, le=100), cursor: str | None = None) -> dict[str, Any]:
    """The caller's jobs, newest first. ``next_cursor`` fetches the next page."""
    state = _state(request)
    tenant = state.keys.tenant_of(request)
    rows = await state.ledger.list_jobs(tenant, status=status, since=since, limit=limit,
                                        cursor=_decode_cursor(cursor) if cursor else None)
    next_cursor = _encode_cursor(rows[-1][1], rows[-1][0].request_id) if len(rows) == limit else None
    return {"object": "list", "data": [job_status(view).model_dump() for view, _ in rows],
            "next_cursor": next_cursor}


@router.get("/v1/usage")
async def usage(request: Request) -> dict[str, Any]:
    """Token usage of the caller's finished requests."""
    state = _state(request)
    tenant = state.keys.tenant_of(request)
    return {"tenant": tenant, **await state.ledger.usage(tenant)}


def _encode_cursor(created: float, request_id: str) -> str:
    return base64.urlsafe_b64encode(f"{created!r}|{request_id}".encode()).decode()


def _decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        created, _, request_id = base64.urlsafe_b64decode(cursor.encode()).decode().partition("|")
        at = float(created)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest("cursor is not one this API returned", param="cursor") from exc
    if not 0 <= at < 1e11:  # finite and a time Postgres can hold
        raise InvalidRequest("cursor is not one this API returned", param="cursor")
    return at, request_id


async def _owned(state: GatewayState, request_id: str, tenant: str | None) -> JobView:
    """The caller's job ``request_id`` (looked up by its job key, so another tenant's ``request_id`` is
    another job, never reached from here); a missing one is 404, and so is an ID no client could have."""
    if not 0 < len(request_id) <= MAX_REQUEST_ID_LEN or any(ord(c) < 32 or c == "\x7f" for c in request_id):
        raise _unknown(request_id[:MAX_REQUEST_ID_LEN].encode("unicode_escape").decode())
    return _mine(await state.jobs.get(job_key(tenant, request_id)), request_id, tenant)


def _mine(job: JobView | None, request_id: str, tenant: str | None) -> JobView:
    """Defence in depth: the key already names the tenant; a row of another tenant is still 404."""
    if job is None or job.tenant != tenant:
        raise _unknown(request_id)
    return job


def _unknown(request_id: str) -> NotFound:
    return NotFound(f"No request with id {request_id!r}.", param="request_id")


def job_status(job: JobView) -> JobStatus:
    result = None
    if job.status is Status.COMPLETED:
        result = JobResult(
            text=job.text,
            finish_reason=job.finish_reason,
            usage={"prompt_tokens": job.prompt_tokens or 0, "completion_tokens": job.completion_tokens or 0},
        )
    return JobStatus(id=job.client_id, status=job.status.value, model=job.model, model_version=job.model_version,
                     result=result, error=job.error, timings=job.timings,
                     redrive_of=client_id_of(job.redrive_of) if job.redrive_of else None,
                     redriven_as=[client_id_of(k) for k in job.redriven_as])


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    """The registered models (OpenAI's list shape), each with its version and whether a live worker serves
    it now (from the workers' load hashes; ``served`` is null when Redis cannot be read: unknown, not no)."""
    state = _state(request)
    state.keys.tenant_of(request)  # (a 401 like every /v1 route's)
    served = await _served(state)
    return {"object": "list", "data": [_model_card(m, served) for m in state.registry]}


@router.get("/v1/models/{model}")
async def get_model(model: str, request: Request) -> dict[str, Any]:
    state = _state(request)
    state.keys.tenant_of(request)
    registered = state.registry.get(model)  # UnknownModel: 404 model_not_found
    return _model_card(registered, await _served(state))


async def _served(state: GatewayState) -> dict[str, dict[str, int]] | None:
    try:
        return await state.loads.serving()
    except (RedisError, OSError):
        return None


def _model_card(model: RegisteredModel, served: dict[str, dict[str, int]] | None) -> dict[str, Any]:
    versions = (served or {}).get(model.name, {})
    return {"id": model.name, "object": "model", "created": 0, "owned_by": "inferlog",
            "version": next(iter(versions), None) or model.recorded_version(),
            "served": None if served is None else bool(versions), "workers": sum(versions.values())}


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """Ready means: can accept and durably record submits: Postgres answers, and the broker is reachable
    or the outbox relay is healthy (accepted requests wait in the ledger until the broker returns). Beside the
    checks: the accepted jobs in flight, and those awaiting ``inferlog redrive`` (their records were on an
    earlier broker log; they hold no admission slot)."""
    state = _state(request)
    checks: dict[str, str] = {}
    detail: dict[str, int] = {}
    try:
        await state.ledger.ping()
        checks["postgres"] = "ok"
        count = await state.ledger.open_count()
        detail = {"in_flight": count.in_flight, "awaiting_redrive": count.awaiting_redrive}
    except StoreUnavailable as exc:
        checks["postgres"] = str(exc)
    broker_up = await state.broker_ready()  # type: ignore[operator]
    checks["broker"] = "ok" if broker_up else "unreachable"
    checks["outbox"] = "ok" if state.relay.healthy else "failing"
    ready = checks["postgres"] == "ok" and (broker_up or state.relay.healthy)
    return JSONResponse(status_code=200 if ready else 503, content={"ready": ready, "checks": checks, **detail})
