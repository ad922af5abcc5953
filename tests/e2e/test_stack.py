"""The whole stack as processes (``inferlog up`` with the tiny model), driven over HTTP as a client would."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from inferlog.hot import Keys
from inferlog.topics import Topics
from tests.conftest import drop_schema, eventually, free_port, make_settings
from tests.e2e.conftest import RunningStack, inferlog_up

pytestmark = pytest.mark.e2e

CHAT = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def stack(run_id: str, tiny_dir: Path) -> Iterator[RunningStack]:
    # A broker port nobody listens on: `inferlog up` starts its own Tansu there.
    settings = make_settings(run_id, f"127.0.0.1:{free_port()}", tiny_dir, suffix="e2e")
    with inferlog_up(settings, extra_env={"INFERLOG_WORKER_NUM_BLOCKS": "64"}) as running:
        yield running
    asyncio.run(drop_schema(settings.postgres_schema))


@pytest.fixture
async def http(stack: RunningStack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as client:
        yield client


async def submit(http: httpx.AsyncClient, **body: Any) -> str:
    response = await http.post("/v1/requests", json=body)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


async def wait_terminal(http: httpx.AsyncClient, request_id: str, timeout: float = 120) -> dict[str, Any]:
    async def poll() -> dict[str, Any] | None:
        response = await http.get(f"/v1/requests/{request_id}")
        if response.status_code == 404:
            return None  # a direct producer's record: not claimed yet
        job = response.json()
        return job if job["status"] in ("completed", "failed", "cancelled", "expired") else None

    return await eventually(poll, timeout=timeout, interval=0.2)  # type: ignore[no-any-return]


async def test_submit_then_poll_completes(http: httpx.AsyncClient) -> None:
    request_id = await submit(http, messages=CHAT, max_tokens=12, ignore_eos=True)
    job = await wait_terminal(http, request_id)
    assert job["status"] == "completed", job
    assert job["result"]["finish_reason"] == "length"
    assert job["result"]["usage"]["completion_tokens"] == 12 and job["result"]["usage"]["prompt_tokens"] > 0
    assert job["model"] == "tiny-llama" and job["model_version"].startswith("sha256:")
    t = job["timings"]
    assert t["received_at"] <= t["queued_at"] <= t["tokenized_at"] <= t["admitted_at"] <= t["first_token_at"] \
        <= t["completed_at"]


async def test_short_request_overtakes_a_running_batch_of_long_ones(stack: RunningStack,
                                                                    http: httpx.AsyncClient) -> None:
    longs = [await submit(http, messages=CHAT, max_tokens=400, ignore_eos=True) for _ in range(2)]

    async def batch_running() -> bool:  # the jobs' own status (the load hash lags up to a second)
        return all([await _status_is(http, rid, "running") for rid in longs])

    await eventually(batch_running, timeout=60, interval=0.05)
    short = await submit(http, messages=CHAT, max_tokens=4, ignore_eos=True)
    short_job = await wait_terminal(http, short)
    assert short_job["status"] == "completed"
    long_jobs = [await wait_terminal(http, rid) for rid in longs]
    assert all(j["status"] == "completed" for j in long_jobs)
    # Admitted after the longs and finished before them, by the worker's clock (a status read after the short
    # one ended would also time the client's polling, and 400 tiny-model tokens take about a second).
    assert short_job["timings"]["completed_at"] < min(j["timings"]["completed_at"] for j in long_jobs)
    assert short_job["timings"]["admitted_at"] > max(j["timings"]["admitted_at"] for j in long_jobs)


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


async def test_gateway_never_loads_torch(stack: RunningStack) -> None:
    assert "libtorch" not in _maps(stack.pids["gateway"])
    assert "libtorch" in _maps(stack.pids["gpu-worker"])  # the check can see torch where it is loaded


async def test_bad_input_leaves_the_stack_serving(http: httpx.AsyncClient) -> None:
    bad = [
        (b'{"messages": [', "application/json", 400),
        (json.dumps({"messages": CHAT, "max_tokens": -3}).encode(), "application/json", 400),
        (json.dumps({"messages": [{"role": "user", "content": "x " * 900}]}).encode(), "application/json", 400),
        (json.dumps({"messages": CHAT, "model": "nope"}).encode(), "application/json", 404),
        (json.dumps({}).encode(), "application/json", 400),
        (b"hello", "text/plain", 415),
    ]
    for body, content_type, status in bad:
        response = await http.post("/v1/requests", content=body, headers={"content-type": content_type})
        assert response.status_code == status, response.text
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    job = await wait_terminal(http, await submit(http, messages=CHAT, max_tokens=3))
    assert job["status"] == "completed"


async def test_readyz_and_healthz(http: httpx.AsyncClient) -> None:
    assert (await http.get("/healthz")).json() == {"status": "ok"}
    ready = await http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True


async def test_long_poll_returns_when_the_job_ends(http: httpx.AsyncClient) -> None:
    request_id = await submit(http, messages=CHAT, max_tokens=40, ignore_eos=True)
    started = asyncio.get_running_loop().time()
    response = await http.get(f"/v1/requests/{request_id}", params={"wait": 30}, timeout=40)
    waited = asyncio.get_running_loop().time() - started
    assert response.json()["status"] == "completed"
    assert waited < 25  # it returned when the job ended, not when the wait did
    quick = await http.get(f"/v1/requests/{request_id}", params={"wait": 30})
    assert quick.json()["status"] == "completed"
    bad = await http.get(f"/v1/requests/{request_id}", params={"wait": -1})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "wait"


async def _sse_events(http: httpx.AsyncClient, request_id: str, after: int | None = None
                      ) -> list[tuple[str, dict[str, Any]]]:
    events = []
    params = {} if after is None else {"starting_after": after}
    async with http.stream("GET", f"/v1/requests/{request_id}/stream", params=params, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        event = None
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                events.append((event or "", json.loads(line[6:])))
                if event == "done":  # every read of the job answers terminal from here (issue 12)
                    after_done = (await http.get(f"/v1/requests/{request_id}")).json()
                    assert after_done["status"] == events[-1][1]["status"], "a poll right after done disagreed"
    return events


def _deltas(events: list[tuple[str, dict[str, Any]]]) -> list[tuple[int, str]]:
    return [(data["seq"], data["text"]) for name, data in events if name == "delta"]


async def test_stream_gives_late_clients_the_text_so_far_then_the_rest(stack: RunningStack,
                                                                        http: httpx.AsyncClient) -> None:
    request_id = await submit(http, messages=CHAT, max_tokens=120, ignore_eos=True)
    await eventually(lambda: _status_is(http, request_id, "running"), timeout=30, interval=0.05)
    await asyncio.sleep(0.5)  # join late: some text exists already
    early, late, resumed = await asyncio.gather(_sse_events(http, request_id), _sse_events(http, request_id),
                                                _sse_events(http, request_id, after=7))
    job = await wait_terminal(http, request_id)
    for events in (early, late):
        assert events[-1] == ("done", {"status": "completed", "finish_reason": "length", "completion_tokens": 120})
        deltas = _deltas(events)
        assert [seq for seq, _ in deltas] == list(range(1, len(deltas) + 1)), "chunks not numbered 1, 2, ..."
        assert "".join(text for _, text in deltas) == job["result"]["text"]
    whole = _deltas(early)
    assert len(whole) > 10
    assert _deltas(resumed) == whole[7:], "starting_after=7 did not give exactly the chunks after 7"

    # Once the live stream is gone (expired), a cursor resumes from the chunk ends kept with the result.
    redis = Redis.from_url(stack.settings.redis_url, decode_responses=True)
    try:
        assert await redis.delete(Keys(stack.settings.redis_prefix).stream(request_id)) == 1
    finally:
        await redis.aclose()
    assert _deltas(await _sse_events(http, request_id, after=3)) == whole[3:]
    assert _deltas(await _sse_events(http, request_id, after=len(whole))) == []
    past = await http.get(f"/v1/requests/{request_id}/stream", params={"starting_after": len(whole) + 1})
    assert past.status_code == 400 and past.json()["error"]["param"] == "starting_after"
    for garbage in (b"9" * 5000, b"\xb2", b"-1"):
        bad = await http.get(f"/v1/requests/{request_id}/stream", headers={"Last-Event-ID": garbage})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "Last-Event-ID", garbage


async def _status_is(http: httpx.AsyncClient, request_id: str, status: str) -> bool:
    return (await http.get(f"/v1/requests/{request_id}")).json()["status"] == status


async def test_cancel_stops_running_and_queued_jobs(stack: RunningStack, http: httpx.AsyncClient) -> None:
    running = await submit(http, messages=CHAT, max_tokens=450, ignore_eos=True)
    await eventually(lambda: _status_is(http, running, "running"), timeout=30, interval=0.05)
    cancelled = await http.delete(f"/v1/requests/{running}")
    assert cancelled.status_code == 202
    job = await wait_terminal(http, running, timeout=30)
    assert job["status"] == "cancelled"
    assert job["result"] is None
    again = await http.delete(f"/v1/requests/{running}")
    assert again.status_code == 200 and again.json()["status"] == "cancelled"
    assert (await http.delete("/v1/requests/nope")).status_code == 404

    # A deadline that passes mid-generation ends the job expired. 0.5 s: the tiny model wrote all 450 tokens
    # within 1.5 s of the submit on a CI run (2026-12-04); a deadline that passes before the job runs ends it
    # expired too (the tokenizer or the worker's admission).
    expiring = await submit(http, messages=CHAT, max_tokens=450, ignore_eos=True, deadline_s=0.5)
    job = await wait_terminal(http, expiring, timeout=30)
    assert job["status"] == "expired" and job["error"]["code"] == "deadline_exceeded"


async def test_resubmitting_with_the_same_key_is_one_job(http: httpx.AsyncClient) -> None:
    body = {"messages": CHAT, "max_tokens": 6}
    first = await http.post("/v1/requests", json=body, headers={"Idempotency-Key": "same-key-1"})
    job = await wait_terminal(http, first.json()["id"])
    again = await http.post("/v1/requests", json=body, headers={"Idempotency-Key": "same-key-1"})
    assert again.status_code == 202 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["status"] == "completed"
    assert (await http.get(f"/v1/requests/{first.json()['id']}")).json() == job


def _direct(request_id: str, **fields: Any) -> bytes:
    record = {"schema_version": 1, "request_id": request_id, "model": "tiny-llama",
              "messages": [{"role": "user", "content": "hello"}], "params": {"max_tokens": 4}}
    for key, value in fields.items():
        if key in ("max_tokens", "temperature", "top_p", "stop"):
            record["params"][key] = value  # type: ignore[index]
        else:
            record[key] = value
    return json.dumps(record).encode()


DIRECT_BAD_RECORDS: list[tuple[str, str | None, bytes]] = [
    ("max_tokens zero", "d-mt0", _direct("d-mt0", max_tokens=0)),
    ("max_tokens negative", "d-mtneg", _direct("d-mtneg", max_tokens=-5)),
    ("max_tokens huge", "d-mthuge", _direct("d-mthuge", max_tokens=10**9)),
    ("max_tokens float", "d-mtfloat", _direct("d-mtfloat", max_tokens=1.5)),
    ("temperature negative", "d-temp", _direct("d-temp", temperature=-1)),
    ("temperature NaN", "d-nan", _direct("d-nan").replace(b'"max_tokens": 4', b'"max_tokens": 4, "temperature": NaN')),
    ("top_p zero", "d-topp0", _direct("d-topp0", top_p=0)),
    ("top_p above one", "d-topp2", _direct("d-topp2", top_p=1.5)),
    ("too many stops", "d-stops", _direct("d-stops", stop=["a", "b", "c", "d", "e"])),
    ("empty messages", "d-empty", _direct("d-empty", messages=[])),
    ("empty prompt", "d-emptyprompt", _direct("d-emptyprompt", messages=None, prompt="")),
    ("unknown role", "d-role", _direct("d-role", messages=[{"role": "wizard", "content": "x"}])),
    ("unknown model", "d-model", _direct("d-model", model="gpt-17")),
    ("prompt beyond context", "d-long", _direct("d-long", messages=[{"role": "user", "content": "word " * 900}])),
    ("invalid utf-8", "d-utf8", b'{"request_id": "d-utf8", "prompt": "\xff\xfe"}'),
    ("lone surrogate", "d-surrogate", _direct("d-surrogate").replace(b'"hello"', b'"\\ud800 x"')),
    ("not json, no key", None, b"{{{ garbage"),
]


async def test_direct_records_with_bad_input_end_failed(stack: RunningStack, http: httpx.AsyncClient) -> None:
    """Direct producers skip the gateway's checks: the tokenizer checks the same things, ends each bad
    record ``failed`` with a message, and keeps consuming."""
    from aiokafka import AIOKafkaProducer

    topics = Topics.from_settings(stack.settings)
    producer = AIOKafkaProducer(bootstrap_servers=stack.settings.kafka_bootstrap, enable_idempotence=False)
    await producer.start()
    try:
        for _case, request_id, value in DIRECT_BAD_RECORDS:
            await producer.send_and_wait(topics.requests, value, key=request_id.encode() if request_id else None)
        await producer.send_and_wait(topics.requests, _direct("d-good"), key=b"d-good")
    finally:
        await producer.stop()
    good = await wait_terminal(http, "d-good")
    assert good["status"] == "completed"  # claimed by the tokenizer on first sight, then generated
    for case, request_id, _value in DIRECT_BAD_RECORDS:
        if request_id is None:
            continue
        job = await wait_terminal(http, request_id, timeout=30)
        assert job["status"] == "failed", (case, job)
        assert job["error"]["message"], case


async def test_a_conflicting_direct_record_is_never_generated(stack: RunningStack, http: httpx.AsyncClient) -> None:
    from aiokafka import AIOKafkaProducer

    original = await submit(http, messages=CHAT, max_tokens=5, request_id="d-conflict")
    job = await wait_terminal(http, original)
    topics = Topics.from_settings(stack.settings)
    producer = AIOKafkaProducer(bootstrap_servers=stack.settings.kafka_bootstrap, enable_idempotence=False)
    await producer.start()
    try:
        await producer.send_and_wait(topics.requests, _direct("d-conflict", max_tokens=7), key=b"d-conflict")
        await producer.send_and_wait(topics.requests, _direct("d-after"), key=b"d-after")
    finally:
        await producer.stop()
    assert (await wait_terminal(http, "d-after"))["status"] == "completed"  # processed after the conflict
    assert (await http.get(f"/v1/requests/{original}")).json() == job  # the original job is untouched


async def test_direct_records_are_on_the_log_once_and_generated_once(stack: RunningStack,
                                                                     http: httpx.AsyncClient) -> None:
    """A direct producer's records, claimed by the tokenizer, are never produced again by the gateway's
    outbox relay (it used to, a few seconds later): read past the relay's grace, the requests topic holds
    each once, and each was attempted once, while the relay stayed healthy."""
    from aiokafka import AIOKafkaProducer

    from inferlog.messages import EventRecord
    from tests.faults.harness import read_topic

    topics = Topics.from_settings(stack.settings)
    ids = [f"d-once-{i}" for i in range(5)]
    producer = AIOKafkaProducer(bootstrap_servers=stack.settings.kafka_bootstrap, enable_idempotence=False)
    await producer.start()
    try:
        for request_id in ids:
            await producer.send_and_wait(topics.requests, _direct(request_id), key=request_id.encode())
    finally:
        await producer.stop()
    for request_id in ids:
        assert (await wait_terminal(http, request_id))["status"] == "completed"
    await asyncio.sleep(10)  # several relay intervals past its grace
    assert (await http.get("/readyz")).json()["checks"]["outbox"] == "ok"
    on_log = [key.decode() for key, _value in await read_topic(stack.settings, topics.requests) if key]
    assert {request_id: on_log.count(request_id) for request_id in ids} == dict.fromkeys(ids, 1)
    attempts = [EventRecord.model_validate_json(value) for _key, value in await read_topic(stack.settings, topics.events)]
    running = [e.request_id for e in attempts if e.stage == "gpu-worker" and e.status.value == "running"]
    assert {request_id: running.count(request_id) for request_id in ids} == dict.fromkeys(ids, 1)


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
async def test_a_body_of_several_megabytes_sent_in_one_write_gets_its_413(stack: RunningStack,
                                                                          declared: bool) -> None:
    """The client writes its whole body, then reads: the 413 envelope must be there to read (answering
    mid-body and closing the connection under the client would show it a reset instead). Measured: uvicorn
    already lets the client finish its write (6 MB and 40 MB, declared or chunked); this guards that."""
    from urllib.parse import urlparse

    url = urlparse(stack.url)
    body = b'{"prompt": "' + b"x" * 6_000_000 + b'"}'
    if declared:
        head = f"POST /v1/requests HTTP/1.1\r\nHost: {url.hostname}\r\nContent-Type: application/json\r\n" \
               f"Content-Length: {len(body)}\r\n\r\n".encode()
        payload = head + body
    else:
        head = f"POST /v1/requests HTTP/1.1\r\nHost: {url.hostname}\r\nContent-Type: application/json\r\n" \
               "Transfer-Encoding: chunked\r\n\r\n".encode()
        payload = head + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    try:
        writer.write(payload)  # one write of several MB
        await writer.drain()
        head_bytes = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=30)
        headers = dict(line.split(b": ", 1) for line in head_bytes.split(b"\r\n")[1:] if b": " in line)
        content = await asyncio.wait_for(reader.readexactly(int(headers[b"content-length"])), timeout=30)
    finally:
        writer.close()
    assert b" 413 " in head_bytes.split(b"\r\n")[0], head_bytes[:300]
    error = json.loads(content)["error"]
    assert error["code"] == "request_too_large" and set(error) == {"message", "type", "param", "code"}


async def test_a_conflict_sent_while_the_original_runs_is_dead_lettered_and_never_attempted(
        stack: RunningStack, http: httpx.AsyncClient) -> None:
    """A direct record that reuses a running job's ID with another payload: the tokenizer dead-letters it as
    a conflict. Sent while the original still runs (after it ended, the worker's terminal check would hide
    a tokenizer that forwarded it), and counted by attempts, not outcomes."""
    from aiokafka import AIOKafkaProducer

    from inferlog.messages import DeadLetter, EventRecord
    from tests.faults.harness import read_topic

    original = await submit(http, messages=CHAT, max_tokens=300, ignore_eos=True, request_id="d-conflict-live")

    async def running() -> bool:
        return (await http.get(f"/v1/requests/{original}")).json()["status"] == "running"

    await eventually(running, timeout=60, interval=0.05)
    topics = Topics.from_settings(stack.settings)
    producer = AIOKafkaProducer(bootstrap_servers=stack.settings.kafka_bootstrap, enable_idempotence=False)
    await producer.start()
    try:
        await producer.send_and_wait(topics.requests, _direct("d-conflict-live", max_tokens=7), key=b"d-conflict-live")
    finally:
        await producer.stop()
    assert (await http.get(f"/v1/requests/{original}")).json()["status"] == "running", "not sent while it ran"
    job = await wait_terminal(http, original)
    assert job["status"] == "completed" and job["result"]["usage"]["completion_tokens"] == 300, job

    async def conflict_dead_lettered() -> bool:
        dead = [DeadLetter.model_validate_json(v) for _k, v in await read_topic(stack.settings, topics.dlq)]
        return any(d.request_id == "d-conflict-live" and d.error.startswith("conflict") for d in dead)

    await eventually(conflict_dead_lettered, timeout=30, interval=0.5)
    events = [EventRecord.model_validate_json(v) for _k, v in await read_topic(stack.settings, topics.events)]
    attempts = [e for e in events if e.request_id == "d-conflict-live" and e.stage == "gpu-worker"
                and e.status.value == "running"]
    assert len(attempts) == 1, attempts
