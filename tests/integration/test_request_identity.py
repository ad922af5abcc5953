"""Request identity at the gateway, against the real Postgres and broker: jobs keyed per tenant (the
migration's SQL derivation agrees with the library's), a keyed retry answered before admission refuses
it, the seed policy, and the idempotency hash over what the client sent."""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import httpx
import pytest

from inferlog.config import InferlogSettings
from inferlog.db import connect_pool, migrate, migration_files
from inferlog.identity import job_key
from inferlog.messages import ErrorInfo, ResultRecord, Status
from inferlog_gateway.main import create_app
from inferlog_gateway.settings import GatewaySettings
from inferlog_store.sink import ResultSink
from tests.conftest import connect_to_schema
from tests.unit.test_identity import IDS, TENANTS

pytestmark = pytest.mark.integration

CHAT = [{"role": "user", "content": "hi"}]


@asynccontextmanager
async def gateway(settings: InferlogSettings, **options: object) -> AsyncIterator[httpx.AsyncClient]:
    common_updates = {k: options.pop(k) for k in list(options) if k in ("max_in_flight",)}
    common = settings.model_copy(update=common_updates)
    app = create_app(GatewaySettings(common=common, **options))  # type: ignore[arg-type]
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
            yield http


async def _open_requests(settings: InferlogSettings) -> int:
    conn = await connect_to_schema(settings)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM requests WHERE status_rank < 100"))
    finally:
        await conn.close()


async def test_the_migrations_sql_derives_the_same_keys(settings: InferlogSettings) -> None:
    conn = await connect_to_schema(settings)
    try:
        for tenant, client_id in itertools.product(TENANTS, IDS):
            assert await conn.fetchval("SELECT inferlog_job_key($1, $2)", tenant, client_id) == \
                job_key(tenant, client_id), (tenant, client_id)
    finally:
        await conn.close()


async def test_two_tenants_same_id_are_two_jobs_that_see_only_themselves(settings: InferlogSettings) -> None:
    suffix = uuid.uuid4().hex[:6]
    alice, bob = f"alice-{suffix}", f"bob-{suffix}"  # tenants of this test alone (the schema is shared)
    keys = {"ka": alice, "kb": bob}
    rid = "same"
    async with gateway(settings, api_keys=keys) as http:
        a = await http.post("/v1/requests", json={"messages": CHAT, "max_tokens": 4, "request_id": rid},
                            headers={"Authorization": "Bearer ka"})
        b = await http.post("/v1/requests", json={"prompt": "other", "max_tokens": 9, "request_id": rid},
                            headers={"Authorization": "Bearer kb"})
        assert a.status_code == b.status_code == 202, (a.text, b.text)  # not 422: another tenant's ID is free
        assert a.json()["id"] == b.json()["id"] == rid
        assert "Idempotent-Replayed" not in b.headers
        assert a.json()["status_url"].endswith(f"/v1/requests/{rid}")
    conn = await connect_to_schema(settings)
    try:
        rows = await conn.fetch("SELECT request_id, tenant FROM requests WHERE tenant = ANY($1::text[])",
                                [alice, bob])
    finally:
        await conn.close()
    assert sorted((r["request_id"], r["tenant"]) for r in rows) == [(f"{alice}/{rid}", alice), (f"{bob}/{rid}", bob)]


async def test_a_keyed_retry_is_answered_while_admission_refuses_new_work(settings: InferlogSettings) -> None:
    key = f"keyed-{uuid.uuid4().hex[:6]}"
    body = {"messages": CHAT, "max_tokens": 4}
    async with gateway(settings, max_in_flight=10_000) as http:
        first = await http.post("/v1/requests", json=body, headers={"Idempotency-Key": key})
        assert first.status_code == 202
    async with gateway(settings, max_in_flight=await _open_requests(settings)) as http:
        retry = await http.post("/v1/requests", json=body, headers={"Idempotency-Key": key})
        assert retry.status_code == 202, retry.text
        assert retry.headers["Idempotent-Replayed"] == "true" and retry.json()["id"] == key
        in_body = await http.post("/v1/requests", json={**body, "request_id": key})
        assert in_body.status_code == 202 and in_body.headers["Idempotent-Replayed"] == "true"
        reused = await http.post("/v1/requests", json={**body, "max_tokens": 5}, headers={"Idempotency-Key": key})
        assert reused.status_code == 422, reused.text  # the same answer an idle system gives, not 429
        new = await http.post("/v1/requests", json=body, headers={"Idempotency-Key": f"{key}-new"})
        assert new.status_code == 429 and int(new.headers["Retry-After"]) >= 1, new.text
        unkeyed = await http.post("/v1/requests", json=body)
        assert unkeyed.status_code == 429


async def test_an_identical_retry_after_the_default_max_tokens_changed_is_a_replay(
        settings: InferlogSettings) -> None:
    key = f"defaults-{uuid.uuid4().hex[:6]}"
    body = {"messages": CHAT}  # max_tokens left to the gateway's default
    async with gateway(settings, default_max_tokens=24) as http:
        assert (await http.post("/v1/requests", json=body, headers={"Idempotency-Key": key})).status_code == 202
    async with gateway(settings, default_max_tokens=12) as http:  # restarted with a new default
        retry = await http.post("/v1/requests", json=body, headers={"Idempotency-Key": key})
        assert retry.status_code == 202, retry.text
        assert retry.headers["Idempotent-Replayed"] == "true"
        other = await http.post("/v1/requests", json={**body, "max_tokens": 7}, headers={"Idempotency-Key": key})
        assert other.status_code == 422
    conn = await connect_to_schema(settings)
    try:
        payload = json.loads(await conn.fetchval("SELECT payload FROM requests WHERE request_id = $1", key))
    finally:
        await conn.close()
    assert payload["params"]["max_tokens"] == 24, "the replay changed the original job"


async def test_seed_is_accepted_where_it_changes_nothing_and_refused_elsewhere(settings: InferlogSettings) -> None:
    async with gateway(settings) as http:
        greedy = await http.post("/v1/requests", json={"messages": CHAT, "max_tokens": 4, "seed": 7})
        assert greedy.status_code == 202, greedy.text
        sampled = await http.post("/v1/requests", json={"messages": CHAT, "max_tokens": 4, "seed": 7,
                                                         "temperature": 0.8})
        assert sampled.status_code == 400
        error = sampled.json()["error"]
        assert error["param"] == "seed" and error["code"] == "seed_not_supported"
        assert "temperature 0" in error["message"]


async def test_a_stack_upgraded_in_place_keeps_serving_its_old_tenant_jobs(settings: InferlogSettings) -> None:
    """Rows written before job keys (0001-0002 only) are re-keyed by 0003 and found by their owners."""
    schema = f"{settings.postgres_schema}_up"
    conn = await asyncpg.connect(settings.postgres_url)
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
        await conn.execute(f'SET search_path TO "{schema}"')
        await conn.execute("CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL, "
                           "applied_at timestamptz NOT NULL DEFAULT now())")
        for version, name, sql in migration_files():
            if version < 3:
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name)
        old_rows = (("old-1", "alice"), ("old-2", None), ("old-3", "a tenant/with spaces"),
                    # keys that move onto one another's old key: the re-keying must not trip the primary key
                    ("x", "alice"), ("alice/x", None), ("/a", None), ("//a", None))
        for rid, tenant in old_rows:
            await conn.execute("INSERT INTO requests (request_id, tenant, status, status_rank, payload_hash) "
                               "VALUES ($1, $2, 'completed', 100, 'h')", rid, tenant)
            await conn.execute("INSERT INTO results (request_id, status, text, tenant) "
                               "VALUES ($1, 'completed', $2, $3)", rid, f"text of {rid}", tenant)
        assert (await migrate(settings.postgres_url, schema))[0] == "0003_job_keys.sql"
        rekeyed = {(r["request_id"], r["text"]) for r in await conn.fetch("SELECT request_id, text FROM results")}
        assert {(job_key(tenant, rid), f"text of {rid}") for rid, tenant in old_rows} == rekeyed
        upgraded = settings.model_copy(update={"postgres_schema": schema})
        keys = {"ka": "alice", "kc": "a tenant/with spaces"}
        async with gateway(upgraded, api_keys=keys) as http:
            for rid, key in (("old-1", "ka"), ("old-3", "kc")):
                job = await http.get(f"/v1/requests/{rid}", headers={"Authorization": f"Bearer {key}"})
                assert job.status_code == 200, job.text
                assert job.json()["id"] == rid and job.json()["result"]["text"] == f"text of {rid}"
            assert (await http.get("/v1/requests/old-1", headers={"Authorization": "Bearer kc"})).status_code == 404
        async with gateway(upgraded) as http:  # no API keys: the default tenant's row is unchanged
            job = await http.get("/v1/requests/old-2")
            assert job.status_code == 200 and job.json()["result"]["text"] == "text of old-2"
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()


async def test_a_key_a_broken_record_already_failed_is_taken(settings: InferlogSettings) -> None:
    """A broken direct record's ``failed`` result holds its key (the store's first-sight row): a later
    claim of that key is a conflict, never a job that starts out failed and is skipped as done."""
    rid = f"broken-{uuid.uuid4().hex[:6]}"
    pool = await connect_pool(settings.postgres_url, settings.postgres_schema)
    try:
        await ResultSink(pool).apply([], [ResultRecord(request_id=rid, status=Status.FAILED,
                                                       error=ErrorInfo(message="bad", code="invalid_record"))])
    finally:
        await pool.close()
    async with gateway(settings) as http:
        response = await http.post("/v1/requests", json={"messages": CHAT, "max_tokens": 4, "request_id": rid})
        assert response.status_code == 422, response.text
