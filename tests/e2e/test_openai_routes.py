"""The OpenAI front door (issue 12), first routes, driven with the official ``openai`` SDK against the whole
pipeline (tiny model): chat completions and completions are jobs (generated once, stored, retrievable by
their ID, exactly-once under an Idempotency-Key), ``models.list`` says what is served, and bad input raises
the SDK's own exception classes naming the param, never an InternalServerError."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import TINY, connect_to_schema, free_port
from tests.e2e.conftest import response_ended
from tests.faults.conftest import MakeCluster, start_pipeline
from tests.faults.harness import check, describe

pytestmark = pytest.mark.e2e

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


async def test_the_openai_sdk_gets_durable_jobs(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster("oai")
    start_pipeline(cluster)
    await cluster.wait_ready()
    client = openai.AsyncOpenAI(base_url=f"{cluster.url}/v1", api_key="none", max_retries=0)

    done = await client.chat.completions.create(model=TINY, messages=CHAT, temperature=0, max_tokens=8)  # type: ignore[arg-type]
    text = done.choices[0].message.content
    assert text and done.choices[0].finish_reason in ("stop", "length") and done.model == TINY
    assert done.usage is not None and done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    again = await client.chat.completions.retrieve(done.id)  # read-your-writes: the job, stored
    assert again.choices[0].message.content == text and again.id == done.id

    # Streamed: OpenAI's chunks, the role first, numbered (SSE id) as the worker numbered them; they join to
    # the stored completion, which a retrieve made at once returns (a finished stream is a finished job).
    streamed = await _stream(client, model=TINY, messages=CHAT, temperature=0, max_tokens=30,
                             stream_options={"include_usage": True})
    assert streamed.chunks[0].choices[0].delta.role == "assistant"
    assert streamed.chunks[-1].choices == [] and streamed.chunks[-1].usage is not None
    assert streamed.chunks[-1].usage.completion_tokens == 30 and streamed.finish_reason == "length"
    stored = await client.chat.completions.retrieve(streamed.id)
    assert stored.choices[0].message.content == streamed.text and stored.usage == streamed.chunks[-1].usage
    plain_stream = await _stream(client, model=TINY, messages=CHAT, temperature=0, max_tokens=8)
    assert all(c.usage is None for c in plain_stream.chunks), "usage sent without include_usage"
    assert (await client.chat.completions.retrieve(plain_stream.id)).choices[0].message.content == plain_stream.text
    text_chunks = [c async for c in await client.completions.create(model=TINY, prompt="Once upon a time",
                                                                     max_tokens=6, temperature=0, stream=True)]
    text_id = text_chunks[0].id
    assert "".join(c.choices[0].text for c in text_chunks if c.choices) == (
        await _job_text(cluster, text_id)), "completion chunks do not join to the stored text"

    # Keyed: the same call twice is one job, one generation (the SDK's extra_headers, as the README shows).
    keyed: dict[str, Any] = {"model": TINY, "messages": CHAT, "max_tokens": 6, "extra_headers": {"Idempotency-Key": "oai-k1"}}
    first = await client.chat.completions.create(**keyed, temperature=0)
    second = await client.chat.completions.create(**keyed, temperature=0)
    assert first.id == second.id == "oai-k1" and first.choices[0].message.content == second.choices[0].message.content
    # A keyed stream that broke, asked again without streaming: the same job, answered (not a 422).
    keyed_stream = await _stream(client, **{**keyed, "extra_headers": {"Idempotency-Key": "oai-k2"}}, temperature=0)
    unstreamed = await client.chat.completions.create(**{**keyed, "extra_headers": {"Idempotency-Key": "oai-k2"}},
                                                      temperature=0)
    assert keyed_stream.id == unstreamed.id == "oai-k2" and unstreamed.choices[0].message.content == keyed_stream.text
    # Absent temperature is OpenAI's default (1): sampled, and stored so.
    sampled = await client.chat.completions.create(model=TINY, messages=CHAT, max_tokens=4)  # type: ignore[arg-type]
    assert sampled.choices[0].message.content is not None
    assert (await _payload(cluster, sampled.id))["params"]["temperature"] == 1.0
    assert (await _payload(cluster, "oai-k1"))["params"]["temperature"] == 0.0

    plain = await client.completions.create(model=TINY, prompt="Once upon a time", max_tokens=5, temperature=0)
    assert plain.choices[0].text and plain.object == "text_completion"

    served = {m.id: m.model_extra for m in (await client.models.list()).data}
    assert served[TINY]["served"] is True and served[TINY]["version"], served

    # Every neutral field real clients send is accepted.
    neutral = await client.chat.completions.create(
        model=TINY, messages=[{"role": "developer", "content": "Be brief."}, *CHAT], max_completion_tokens=4,  # type: ignore[list-item]
        temperature=0, n=1, presence_penalty=0, frequency_penalty=0, logprobs=False, user="end-user-7",
        metadata={"k": "v"}, store=False, parallel_tool_calls=None, top_p=1)
    assert neutral.choices[0].message.content is not None

    # Bad input: the SDK's own exceptions, naming the param; never a 5xx.
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="no-such-model", messages=CHAT)  # type: ignore[arg-type]
    for bad, param in [({"n": 2}, "n"), ({"max_tokens": -1}, "max_tokens"), ({"temperature": -1}, "temperature"),
                       ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
                       ({"messages": [{"role": "user", "content": "x " * 30000}]}, "messages")]:
        with pytest.raises(openai.BadRequestError) as raised:
            await client.chat.completions.create(**{"model": TINY, "messages": CHAT, **bad})
        assert raised.value.body is not None and raised.value.body.get("param", "").startswith(param), (bad, raised.value.body)

    # A call whose wait runs out (the SDK's own 5.1 s timeout leaves the gateway 0.1 s) gets the job's ID and
    # x-should-retry: false, and the SDK, retries on, makes no second call: one job, generated once.
    before = await _jobs(cluster)
    slow = client.with_options(timeout=5.1, max_retries=2)
    with pytest.raises(openai.APIStatusError) as waited:
        await slow.chat.completions.create(model=TINY, messages=CHAT, max_tokens=450, temperature=0)  # type: ignore[arg-type]
    assert await _jobs(cluster) == before + 1, "the SDK retried and started another job"
    assert waited.value.status_code == 504 and waited.value.response.headers["x-should-retry"] == "false"
    slow_id = waited.value.response.headers["x-request-id"]
    finished = None
    for _ in range(120):  # (404 not_completed until it ends)
        try:
            finished = await client.chat.completions.retrieve(slow_id)
            break
        except openai.NotFoundError:
            await asyncio.sleep(0.5)
    assert finished is not None and finished.usage is not None and finished.usage.completion_tokens == 450

    ids = [done.id, "oai-k1", "oai-k2", sampled.id, plain.id, neutral.id, slow_id, streamed.id, plain_stream.id, text_id]
    report = await check(cluster.settings, ids)
    assert report.lost == [] and report.generations_by_id == {i: 1 for i in ids}, describe(report)


async def _jobs(cluster: Any) -> int:
    conn = await connect_to_schema(cluster.settings)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM requests"))
    finally:
        await conn.close()


@dataclass
class Streamed:
    id: str
    text: str
    finish_reason: str | None
    chunks: list[Any]


async def _stream(client: openai.AsyncOpenAI, **body: Any) -> Streamed:
    chunks = [chunk async for chunk in await client.chat.completions.create(**body, stream=True)]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len({c.id for c in chunks}) == 1 and len(finish) == 1, "one job's chunks, one finish_reason"
    return Streamed(chunks[0].id, text, finish[0], chunks)


async def _payload(cluster: Any, request_id: str) -> dict[str, Any]:
    conn = await connect_to_schema(cluster.settings)
    try:
        return json.loads(await conn.fetchval("SELECT payload FROM requests WHERE request_id = $1", request_id))  # type: ignore[no-any-return]
    finally:
        await conn.close()


async def _job_text(cluster: Any, request_id: str) -> str:
    conn = await connect_to_schema(cluster.settings)
    try:
        return str(await conn.fetchval("SELECT text FROM results WHERE request_id = $1", request_id))
    finally:
        await conn.close()


async def test_responses_are_jobs_too(make_cluster: MakeCluster) -> None:
    """The Responses API: background returns at once and polls to its end; cancel ends a long one
    ``cancelled``; a streamed response's numbered events resume after any number, with exactly the rest."""
    cluster = await make_cluster("resp")
    start_pipeline(cluster)
    await cluster.wait_ready()
    client = openai.AsyncOpenAI(base_url=f"{cluster.url}/v1", api_key="none", max_retries=0)

    queued = await client.responses.create(model=TINY, input=[{"role": "user", "content": "Hello"}],
                                           instructions="Be brief.", max_output_tokens=12, temperature=0,
                                           background=True)
    assert queued.status in ("queued", "in_progress") and queued.output == []
    ended = await response_ended(client, queued.id, timeout=20)
    # The tiny random model does not stop by itself: it ends at max_output_tokens, which OpenAI calls incomplete.
    assert ended.status == "incomplete" and ended.incomplete_details is not None, ended
    assert ended.incomplete_details.reason == "max_output_tokens" and ended.output_text
    assert ended.usage is not None and ended.usage.output_tokens == 12

    long = await client.responses.create(model=TINY, input="Go on.", max_output_tokens=450, background=True)
    for _ in range(100):  # cancel it while it generates
        if (await client.responses.retrieve(long.id)).status == "in_progress":
            break
        await asyncio.sleep(0.05)
    cancelled = await client.responses.cancel(long.id)
    assert cancelled.status == "cancelled", cancelled
    assert (await client.responses.retrieve(long.id)).status == "cancelled"

    events = [e async for e in await client.responses.create(model=TINY, input="Once upon a time",
                                                             max_output_tokens=40, temperature=0, stream=True)]
    numbers = [e.sequence_number for e in events]
    assert numbers == list(range(len(events))), "events not numbered 0, 1, 2, ..."
    assert events[0].type == "response.created" and events[-1].type == "response.incomplete"
    streamed_id = events[0].response.id
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    stored = await client.responses.retrieve(streamed_id)  # read-your-writes after the stream's end
    assert "".join(deltas) == stored.output_text and stored.status == "incomplete"
    for after in (2, 10, numbers[-3]):
        resumed = [e async for e in await client.responses.retrieve(streamed_id, stream=True, starting_after=after)]
        assert [(e.sequence_number, e.type) for e in resumed] == [(e.sequence_number, e.type) for e in events[after + 1:]]
        assert [e.delta for e in resumed if e.type == "response.output_text.delta"] == deltas[max(0, after - 3):]

    # Bad input names the Responses API's params.
    for bad, param in [({"max_output_tokens": -1}, "max_output_tokens"), ({"previous_response_id": queued.id},
                       "previous_response_id"), ({"tools": [{"type": "function", "name": "f"}]}, "tools"),
                       ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
                        "input.0.content")]:
        with pytest.raises(openai.BadRequestError) as raised:
            await client.responses.create(**{"model": TINY, "input": "x", **bad})
        assert raised.value.body is not None and raised.value.body.get("param") == param, (bad, raised.value.body)

    ids = [queued.id, long.id, streamed_id]
    report = await check(cluster.settings, ids)
    assert report.lost == [] and report.generations_by_id == {i: 1 for i in ids}, describe(report)


async def test_a_broken_stream_resumes_on_another_gateway_with_exactly_the_rest(make_cluster: MakeCluster) -> None:
    """A client streaming a chat completion loses its connection half-way; it resumes through a second
    gateway process with ``starting_after`` (the number of chunks it had) and gets exactly the rest, live:
    the halves join to the stored text, and the job was generated once (attempt events on the log)."""
    cluster = await make_cluster("resume")
    start_pipeline(cluster)
    other_port = free_port()
    cluster.spawn("gw2", "gateway", INFERLOG_GATEWAY_PORT=str(other_port), INFERLOG_GATEWAY_CANCEL_ON_DISCONNECT="true")
    await cluster.wait_ready()
    client = openai.AsyncOpenAI(base_url=f"{cluster.url}/v1", api_key="none", max_retries=0)

    first: list[str] = []
    stream = await client.chat.completions.create(model=TINY, messages=CHAT, max_tokens=450, temperature=0,  # type: ignore[arg-type]
                                                  stream=True)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first.append(chunk.choices[0].delta.content)
        if len(first) == 40:
            break
    await stream.close()  # the connection drops half-way
    job_id = chunk.id
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{other_port}", timeout=60) as other:
        status = (await other.get(f"/v1/requests/{job_id}")).json()["status"]
        assert status == "running", f"the job was {status} at the break: the resume would not be live"
        rest: list[tuple[int, str]] = []
        async with other.stream("GET", f"/v1/requests/{job_id}/stream", params={"starting_after": 40}) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: ") and '"seq"' in line:
                    data = json.loads(line[6:])
                    rest.append((data["seq"], data["text"]))
        after = (await other.get(f"/v1/requests/{job_id}")).json()  # read-your-writes, on the other gateway
    assert after["status"] == "completed" and after["result"]["usage"]["completion_tokens"] == 450
    assert [seq for seq, _ in rest] == list(range(41, 41 + len(rest))), "not exactly the chunks after 40"
    assert "".join(first) + "".join(text for _, text in rest) == after["result"]["text"]

    # A gateway configured to (INFERLOG_GATEWAY_CANCEL_ON_DISCONNECT) cancels the job of a client that left,
    # streaming or waiting; the first gateway (the default) let the job above run to its end.
    cancelling = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{other_port}/v1", api_key="none", max_retries=0)
    left = await cancelling.chat.completions.create(model=TINY, messages=CHAT, max_tokens=450, stream=True)  # type: ignore[arg-type]
    left_id = (await left.__anext__()).id
    await left.close()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{other_port}", timeout=0.5) as impatient:
        with pytest.raises(httpx.ReadTimeout):  # (no X-Stainless-Read-Timeout: the gateway would answer first)
            await impatient.post("/v1/chat/completions", headers={"Idempotency-Key": "left-waiting"},
                                 json={"model": TINY, "messages": CHAT, "max_tokens": 450})
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{other_port}", timeout=60) as other:
        for gone in (left_id, "left-waiting"):
            ended = (await other.get(f"/v1/requests/{gone}", params={"wait": 30})).json()
            assert ended["status"] == "cancelled", ended
    ids = [job_id, left_id, "left-waiting"]
    report = await check(cluster.settings, ids)
    assert report.lost == [] and all(report.generations_by_id.get(i, 0) <= 1 for i in ids), describe(report)
    assert report.generations_by_id[job_id] == 1
