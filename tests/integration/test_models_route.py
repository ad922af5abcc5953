"""``GET /v1/models`` (issue 12's first route): the registered models in OpenAI's list shape, each with its
version and whether a live worker serves it, read from the workers' load hashes in the real Redis; driven
with the official ``openai`` SDK, as a client would."""

from __future__ import annotations

import httpx
import openai
import pytest
from redis.asyncio import Redis

from inferlog.config import InferlogSettings
from inferlog_gateway.main import create_app
from inferlog_gateway.settings import GatewaySettings
from inferlog_worker.load import LoadReporter
from inferlog_worker.ports import LoadSnapshot
from tests.conftest import DEFAULT_MODEL_NAME, TINY

pytestmark = pytest.mark.integration


async def test_models_say_which_a_live_worker_serves(settings: InferlogSettings) -> None:
    app = create_app(GatewaySettings(common=settings))
    redis = Redis.from_url(settings.redis_url)
    try:
        async with app.router.lifespan_context(app):
            http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw/v1")
            client = openai.AsyncOpenAI(base_url="http://gw/v1", api_key="none", http_client=http)
            listed = {m.id: m for m in (await client.models.list()).data}
            assert set(listed) == {TINY, DEFAULT_MODEL_NAME}
            assert all(m.object == "model" and m.owned_by == "inferlog" for m in listed.values())
            assert listed[TINY].model_extra == {"version": None, "served": False, "workers": 0}

            # A worker comes up serving the tiny model: its load hash is what the gateway reads.
            reporter = LoadReporter(redis, settings.redis_prefix, ttl_s=30)
            await reporter.publish(LoadSnapshot(worker_id="models-w1", model=TINY, model_version="sha256:abc",
                                                running=0, admitted=0, waiting=0, tokens_in_flight=0,
                                                free_kv_blocks=8, total_kv_blocks=8, partitions=[]))
            tiny = await client.models.retrieve(TINY)
            assert tiny.model_extra == {"version": "sha256:abc", "served": True, "workers": 1}
            assert (await client.models.retrieve(DEFAULT_MODEL_NAME)).model_extra["served"] is False
            with pytest.raises(openai.NotFoundError):
                await client.models.retrieve("no-such-model")
            await reporter.remove("models-w1")  # it stops: gone at once (or with its TTL, if it died)
            assert (await client.models.retrieve(TINY)).model_extra["served"] is False
            await http.aclose()
    finally:
        await redis.aclose()
