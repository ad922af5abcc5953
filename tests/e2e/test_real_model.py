"""The first thing a new user tries: `inferlog up` with the default model (SmolLM2), then the README's curl."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from inferlog.config import DEFAULT_MODEL_NAME
from tests.conftest import drop_schema, free_port, make_settings
from tests.e2e.conftest import inferlog_up, response_ended
from tests.e2e.test_stack import wait_terminal

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


async def test_greedy_smollm2_knows_the_capital_of_france(run_id: str, tiny_dir: Path, smol_dir: Path) -> None:
    settings = make_settings(run_id, f"127.0.0.1:{free_port()}", tiny_dir, suffix="real",
                             default=DEFAULT_MODEL_NAME)
    try:
        with inferlog_up(settings) as stack:
            async with httpx.AsyncClient(base_url=stack.url, timeout=10) as http:
                response = await http.post("/v1/requests", json={
                    "messages": [{"role": "user", "content": "What is the capital of France?"}],
                    "max_tokens": 32})
                assert response.status_code == 202
                job = await wait_terminal(http, response.json()["id"])
            await _the_openai_sdk_asks_the_same(stack.url)
        assert job["status"] == "completed", job
        assert "Paris" in job["result"]["text"]
        assert job["result"]["finish_reason"] == "stop"
        assert job["model"] == DEFAULT_MODEL_NAME
    finally:
        await drop_schema(settings.postgres_schema)


async def _the_openai_sdk_asks_the_same(url: str) -> None:
    """Issue 12, shown 1 and 2 with the real model: the official SDK's chat call answers "Paris"; streamed,
    the chunks join to the same text; a background response is queued at once and polled to completed."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    answer = await client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=question, temperature=0,  # type: ignore[arg-type]
                                                  max_tokens=32)
    text = answer.choices[0].message.content
    assert text and "Paris" in text and answer.choices[0].finish_reason == "stop", answer
    chunks = [c async for c in await client.chat.completions.create(
        model=DEFAULT_MODEL_NAME, messages=question, temperature=0, max_tokens=32, stream=True)]  # type: ignore[arg-type]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert (await client.chat.completions.retrieve(chunks[0].id)).choices[0].message.content == text
    models = {m.id: m.model_extra for m in (await client.models.list()).data}
    assert models[DEFAULT_MODEL_NAME]["served"] is True and models[DEFAULT_MODEL_NAME]["version"]

    queued = await client.responses.create(model=DEFAULT_MODEL_NAME, input="What is the capital of France?",
                                           instructions="Answer in one sentence.", background=True,
                                           temperature=0, max_output_tokens=48)
    assert queued.status in ("queued", "in_progress")
    response = await response_ended(client, queued.id)
    assert response.status == "completed" and "Paris" in response.output_text, response
