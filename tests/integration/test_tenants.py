"""API keys, tenant isolation, per-tenant and tier admission (429 with Retry-After), listing and usage,
against the real Postgres and broker."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from inferlog.config import InferlogSettings
from inferlog.db import connect_pool
from inferlog.messages import ResultRecord, Status, Usage
from inferlog_gateway.main import create_app
from inferlog_gateway.settings import GatewaySettings
from inferlog_store.sink import ResultSink
from tests.conftest import connect_to_schema

pytestmark = pytest.mark.integration

KEYS = {"key-a": "alice", "key-b": "bob"}
A = {"Authorization": "Bearer key-a"}
B = {"Authorization": "Bearer key-b"}
CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
async def client(settings: InferlogSettings) -> AsyncIterator[httpx.AsyncClient]:
    common = settings.model_copy(update={"max_in_flight": 10_000})
    app = create_app(GatewaySettings(common=common.model_copy(update={"tenant_max_in_flight": 4}), api_keys=KEYS))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
            yield http


async def test_keys_are_required_and_checked(client: httpx.AsyncClient) -> None:
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic key-a"}):
        response = await client.post("/v1/requests", json={"messages": CHAT}, headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert (await client.get("/v1/usage")).status_code == 401


async def test_another_tenants_job_is_404(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/requests", json={"messages": CHAT, "request_id": "alice-1", "max_tokens": 4},
                                 headers=A)
    assert response.status_code == 202
    assert (await client.get("/v1/requests/alice-1", headers=A)).status_code == 200
    for call in (client.get("/v1/requests/alice-1", headers=B), client.delete("/v1/requests/alice-1", headers=B),
                 client.get("/v1/requests/alice-1/stream", headers=B)):
        response = await call
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


async def test_tenant_limit_is_429_with_retry_after_and_others_are_unaffected(client: httpx.AsyncClient) -> None:
    statuses = []
    for i in range(6):
        response = await client.post("/v1/requests", json={"messages": CHAT, "max_tokens": 4,
                                                           "request_id": f"bob-{i}"}, headers=B)
        statuses.append(response.status_code)
        if response.status_code == 429:
            assert int(response.headers["Retry-After"]) >= 1
            assert response.json()["error"]["code"] == "tenant_limit"
    assert statuses == [202, 202, 202, 202, 429, 429]
    other = await client.post("/v1/requests", json={"messages": CHAT, "max_tokens": 4}, headers=A)
    assert other.status_code == 202


async def test_list_pages_through_own_jobs_only(client: httpx.AsyncClient) -> None:
    page = (await client.get("/v1/requests", params={"limit": 2}, headers=B)).json()
    ids = [job["id"] for job in page["data"]]
    while page["next_cursor"]:
        page = (await client.get("/v1/requests", params={"limit": 2, "cursor": page["next_cursor"]},
                                 headers=B)).json()
        ids += [job["id"] for job in page["data"]]
    assert sorted(ids) == [f"bob-{i}" for i in range(4)]
    queued = (await client.get("/v1/requests", params={"status": "queued"}, headers=B)).json()["data"]
    assert {job["status"] for job in queued} == {"queued"}
    bad = await client.get("/v1/requests", params={"cursor": "!!"}, headers=B)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "cursor"


async def test_usage_sums_the_tenants_results(client: httpx.AsyncClient, settings: InferlogSettings) -> None:
    pool = await connect_pool(settings.postgres_url, settings.postgres_schema)
    try:
        await ResultSink(pool).apply([], [
            ResultRecord(request_id="alice-1", status=Status.COMPLETED, tenant="alice", text="x",
                         usage=Usage(prompt_tokens=10, completion_tokens=4)),
        ])
    finally:
        await pool.close()
    assert (await client.get("/v1/usage", headers=A)).json() == {
        "tenant": "alice", "requests": 1, "prompt_tokens": 10, "completion_tokens": 4}
    assert (await client.get("/v1/usage", headers=B)).json()["requests"] == 0


async def test_batch_tier_is_shed_before_interactive(settings: InferlogSettings) -> None:
    conn = await connect_to_schema(settings)
    open_now = int(await conn.fetchval("SELECT count(*) FROM requests WHERE status_rank < 100"))
    batch_now = int(await conn.fetchval("SELECT count(*) FROM requests WHERE status_rank < 100 "
                                        "AND priority = 'batch'"))
    await conn.close()
    # Room for exactly one more interactive request (interactive work counts its own); the batch tier's share
    # of everything in flight is already used up.
    common = settings.model_copy(update={"max_in_flight": open_now - batch_now + 1, "batch_share": 0.5})
    assert int(common.max_in_flight * 0.5) <= open_now
    app = create_app(GatewaySettings(common=common))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
            batch = await http.post("/v1/requests", json={"messages": CHAT, "max_tokens": 4, "priority": "batch"})
            assert batch.status_code == 429 and batch.json()["error"]["code"] == "overloaded"
            interactive = await http.post("/v1/requests", json={"messages": CHAT, "max_tokens": 4})
            assert interactive.status_code == 202
            again = await http.post("/v1/requests", json={"messages": CHAT, "max_tokens": 4})
            assert again.status_code == 429 and "Retry-After" in again.headers
