"""Admission after the broker lost its log: open jobs that only an earlier epoch's log held hold no slot,
and the 429 and /readyz say how many wait for a re-drive (real Postgres and broker)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from inferlog.config import InferlogSettings
from inferlog.db import migrate
from inferlog.epoch import prepare_broker
from inferlog.topics import Topics
from inferlog_gateway.main import create_app
from inferlog_gateway.settings import GatewaySettings
from tests.conftest import connect_to_schema, drop_schema, make_settings

pytestmark = pytest.mark.integration

LIMIT = 3
STRANDED = 5
CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def lost_log(run_id: str, bootstrap: str, tiny_dir: Path) -> AsyncIterator[tuple[InferlogSettings, str]]:
    """A ledger holding ``STRANDED`` open jobs claimed before the current broker epoch began and never
    re-driven into it: an earlier log held their records."""
    s = make_settings(run_id, bootstrap, tiny_dir, suffix="lostlog", max_in_flight=LIMIT)
    await migrate(s.postgres_url, s.postgres_schema)
    prepared = await prepare_broker(s.kafka_bootstrap, Topics.from_settings(s))
    conn = await connect_to_schema(s)
    try:
        for i in range(STRANDED):
            await conn.execute(
                "INSERT INTO requests (request_id, payload_hash, status, status_rank, published, created_at) "
                "VALUES ($1, 'h', 'queued', 10, true, now() - interval '1 hour')", f"old-{i}")
        await conn.execute("INSERT INTO broker_epochs (epoch, bootstrap, layout, written_at) "
                           "VALUES ($1, $2, '{}'::jsonb, $3)", prepared.marker.epoch, s.kafka_bootstrap,
                           prepared.marker.written_at)
    finally:
        await conn.close()
    yield s, prepared.marker.epoch
    await drop_schema(s.postgres_schema)


async def test_open_jobs_of_a_lost_log_hold_no_admission_slot(lost_log: tuple[InferlogSettings, str]) -> None:
    settings, epoch = lost_log
    app = create_app(GatewaySettings(common=settings))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
            ready = (await http.get("/readyz")).json()
            assert ready["awaiting_redrive"] == STRANDED and ready["in_flight"] == 0, ready
            for _ in range(LIMIT):  # 5 open jobs > a limit of 3, and still accepted
                response = await http.post("/v1/requests", json={"messages": CHAT})
                assert response.status_code == 202, response.text
            refused = await http.post("/v1/requests", json={"messages": CHAT})
            assert refused.status_code == 429, refused.text
            message = refused.json()["error"]["message"]
            assert f"{LIMIT} requests are in flight" in message and f"{STRANDED} more accepted jobs" in message
            assert "inferlog redrive" in message

            # Re-driven into this epoch, they can finish again: they count.
            conn = await connect_to_schema(settings)
            try:
                await conn.execute("UPDATE requests SET redriven_epoch = $1 WHERE request_id LIKE 'old-%'", epoch)
            finally:
                await conn.close()
            ready = (await http.get("/readyz")).json()
            assert ready["awaiting_redrive"] == 0 and ready["in_flight"] == LIMIT + STRANDED, ready
