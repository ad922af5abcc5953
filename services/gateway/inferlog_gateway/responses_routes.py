"""OpenAI's Responses API on the job log (issue 12): ``POST /v1/responses`` (``background``, ``stream``),
``GET /v1/responses/{id}`` (``?stream=true&starting_after=N`` resumes its event stream on any gateway) and
``POST /v1/responses/{id}/cancel``.

A response is a job like a chat completion's: mapped by the shared ``responses_request`` (through the chat
mapping), checked, admitted, claimed and produced by the same code; its ``id`` is the job's. Its status is
the job's, in the Responses API's words (``inferlog.batchfile.RESPONSE_STATUS``).

A streamed response's events are numbered from the job's chunks, so a number means the same event on every
gateway, live or from the stored result: 0 ``response.created``, 1 ``response.in_progress``, 2
``response.output_item.added``, 3 ``response.content_part.added``, 3+N the ``response.output_text.delta`` of
the worker's chunk N, then (M chunks) 4+M ``response.output_text.done``, 5+M ``response.content_part.done``,
6+M ``response.output_item.done`` and 7+M the terminal event; a job that ends without text skips the three
``done`` events (its terminal event is 4+M).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse, Response

from inferlog.batchfile import (
    as_responses_error,
    response_message,
    response_object,
    response_text_part,
    responses_request,
)
from inferlog.errors import InvalidRequest, NotFound
from inferlog.identity import client_id_of, job_key
from inferlog.ledger import JobView, request_hash
from inferlog.messages import Priority
from inferlog_gateway.intake import parse_json
from inferlog_gateway.jobs import Chunk, JobReader, StreamRestarted
from inferlog_gateway.openai_routes import (
    call_id,
    cancelling_if_left,
    read_after_claim,
    stream_options,
    transport_free,
    wait_for_answer,
)
from inferlog_gateway.routes import (
    _owned,
    _state,
    accept,
    check_cursor,
    chunk_count,
    read_body,
    sse,
    sse_response,
    stream_error,
)

router = APIRouter()

PREAMBLE = 3
"""The sequence number of the last event before the first chunk's (``response.content_part.added``)."""
CANCEL_WAIT_S = 10.0


@router.post("/v1/responses")
async def create_response(request: Request, idempotency_key: str | None = Header(default=None)) -> Response:
    state = _state(request)
    tenant = state.keys.tenant_of(request)
    body = parse_json(await read_body(request, state.max_body_bytes))
    stream, _include_usage = stream_options(body)
    background = body.get("background")
    if background is not None and not isinstance(background, bool):
        raise InvalidRequest("background must be true or false", param="background")
    request_id = call_id(idempotency_key)
    record = responses_request(body, request_id=request_id, tenant=tenant, default_model=state.registry.default_name,
                               priority=Priority.INTERACTIVE)
    try:
        record, _prompt_tokens = state.intake.checked(record, max_tokens_given=body.get("max_output_tokens") is not None)
    except InvalidRequest as exc:
        raise as_responses_error(exc, instructions=bool(body.get("instructions"))) from exc
    sent = request_hash({**transport_free(body), "route": "responses"}, tenant)
    await accept(state, record, tenant, sent, keyed=idempotency_key is not None)
    key = job_key(tenant, request_id)
    headers = {"X-Request-Id": request_id}
    if stream:  # (a background response outlives its connection, whatever the setting: it is resumed)
        events = _events(state.jobs, key, after=-1)
        return sse_response(events if background else cancelling_if_left(state, key, events), headers=headers)
    read = await read_after_claim(request_id, f"/v1/responses/{request_id}",
                                  state.jobs.get(key) if background else wait_for_answer(request, state, key),
                                  must_end=not background)
    if isinstance(read, JSONResponse):
        return read
    job = read
    return JSONResponse(response_object(job, background=bool(background)), headers=headers)


@router.get("/v1/responses/{request_id}")
async def retrieve_response(request_id: str, request: Request, stream: bool = Query(default=False),
                            starting_after: int | None = Query(default=None, ge=0)) -> Response:
    """The response as it stands; with ``stream=true``, its events (after ``starting_after``, a sequence
    number), live while it generates and from the stored result after."""
    state = _state(request)
    job = await _owned(state, request_id, state.keys.tenant_of(request))
    headers = {"X-Request-Id": job.client_id}
    if stream:
        after = -1 if starting_after is None else starting_after
        await check_cursor(state, job, after, None, past_last=PREAMBLE + 4)
        return sse_response(_events(state.jobs, job.request_id, after=after), headers=headers)
    return JSONResponse(response_object(job), headers=headers)


@router.post("/v1/responses/{request_id}/cancel")
async def cancel_response(request_id: str, request: Request) -> JSONResponse:
    """Cancel it (a queued job never reaches the model, a running one stops within a decode step) and answer
    the response once ended (``cancelled``, or how it ended first), or as it stands after a short wait."""
    state = _state(request)
    job = await _owned(state, request_id, state.keys.tenant_of(request))
    await state.jobs.cancel(job.request_id)
    job = await state.jobs.wait(job.request_id, CANCEL_WAIT_S) or job
    return JSONResponse(response_object(job), headers={"X-Request-Id": job.client_id})


async def _events(jobs: JobReader, key: str, *, after: int) -> AsyncIterator[str]:
    """The response's events numbered as the module says, those after ``after`` (-1: all)."""
    seq = after
    try:
        async for seq, kind, fields in _numbered(jobs, key, after):
            if seq > after:
                yield sse({"type": kind, "sequence_number": seq, **fields}, event=kind)
    except (StreamRestarted, NotFound) as exc:
        error = stream_error(exc)["error"]
        yield sse({"type": "error", "sequence_number": seq + 1, "code": error["code"], "message": error["message"],
                   "param": None}, event="error")


async def _numbered(jobs: JobReader, key: str, after: int) -> AsyncIterator[tuple[int, str, dict[str, Any]]]:
    at = {"item_id": f"msg_{client_id_of(key)}", "output_index": 0, "content_index": 0}
    if after < PREAMBLE:
        current = await jobs.get(key)
        if current is None:
            raise NotFound(f"No response with id {client_id_of(key)!r}.", param="response_id")
        opening = {**response_object(current), "output": [], "usage": None}
        yield 0, "response.created", {"response": {**opening, "status": "queued"}}
        yield 1, "response.in_progress", {"response": {**opening, "status": "in_progress"}}
        yield 2, "response.output_item.added", {"output_index": 0, "item": response_message(current, "in_progress")}
        yield 3, "response.content_part.added", {**at, "part": response_text_part("")}
    last = 0
    async for item in jobs.chunks(key, after=max(0, after - PREAMBLE)):
        if isinstance(item, Chunk):
            last = item.seq
            yield PREAMBLE + item.seq, "response.output_text.delta", {**at, "delta": item.text, "logprobs": []}
            continue
        job: JobView = item
        # The chunk count from what is stored, so the events after it are numbered alike on every replay. A
        # failure stored without text or chunk ends (an earlier attempt streamed) counts the chunks streamed
        # here, and never numbers its terminal event at or below the client's cursor: it always gets one.
        if job.text is not None or job.chunks:
            seq = PREAMBLE + max(chunk_count(job), last) + 1
        else:
            seq = max(PREAMBLE + last + 1, after + 1)
        response = response_object(job)
        if response["output"]:
            message = response["output"][0]
            part = message["content"][0]
            yield seq, "response.output_text.done", {**at, "text": part["text"], "logprobs": []}
            yield seq + 1, "response.content_part.done", {**at, "part": part}
            yield seq + 2, "response.output_item.done", {"output_index": 0, "item": message}
            seq += 3
        kind = {"completed": "response.completed", "incomplete": "response.incomplete"}.get(
            response["status"], "response.failed")
        yield seq, kind, {"response": response}
