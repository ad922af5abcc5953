"""The first thing a new user tries: `inferlog up` with the default model (SmolLM2), then the README's curl."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from inferlog.config import DEFAULT_MODEL_NAME
from tests.conftest import drop_schema, free_port, make_settings
from tests.e2e.conftest import inferlog_up
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
        assert job["status"] == "completed", job
        assert "Paris" in job["result"]["text"]
        assert job["result"]["finish_reason"] == "stop"
        assert job["model"] == DEFAULT_MODEL_NAME
    finally:
        await drop_schema(settings.postgres_schema)
