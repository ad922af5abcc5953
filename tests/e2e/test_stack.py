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
        job = (await http.get(f"/v1/requests/{request_id}")).json()
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
    redis = Redis.from_url(stack.settings.redis_url, decode_responses=True)
    key = f"{stack.settings.redis_prefix}:worker:local-worker-1"
    try:
        longs = [await submit(http, messages=CHAT, max_tokens=400, ignore_eos=True) for _ in range(2)]

        async def batch_running() -> bool:
            return int(await redis.hget(key, "running") or 0) >= 2

        await eventually(batch_running, timeout=60, interval=0.05)
        short = await submit(http, messages=CHAT, max_tokens=4, ignore_eos=True)
        short_job = await wait_terminal(http, short)
        long_states = [(await http.get(f"/v1/requests/{rid}")).json()["status"] for rid in longs]
        assert short_job["status"] == "completed"
        assert long_states == ["running", "running"], long_states  # still generating when the short one ended
        long_jobs = [await wait_terminal(http, rid) for rid in longs]
        assert all(j["status"] == "completed" for j in long_jobs)
        assert short_job["timings"]["completed_at"] < min(j["timings"]["completed_at"] for j in long_jobs)
        assert short_job["timings"]["admitted_at"] > max(j["timings"]["admitted_at"] for j in long_jobs)
    finally:
        await redis.aclose()


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
