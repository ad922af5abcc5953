"""`inferlog up` on a machine without Postgres or Redis (embedded ones forced), and its supervision:
a service killed after start-up comes back and the stack keeps serving."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import eventually, free_port, make_settings
from tests.e2e.conftest import inferlog_up
from tests.e2e.test_stack import CHAT, submit, wait_terminal

pytestmark = pytest.mark.e2e


async def test_up_with_embedded_stores_serves_and_restarts_a_dead_service(
        run_id: str, tiny_dir: Path, tmp_path: Path) -> None:
    settings = make_settings(run_id, f"127.0.0.1:{free_port()}", tiny_dir, suffix="bare", with_smollm2=False,
                             postgres_url="embedded", redis_url="embedded", cache_dir=tmp_path / "cache")
    with inferlog_up(settings) as stack:
        output = "".join(stack.lines)
        assert "postgres pid=" in output and "(embedded" in output and "redis pid=" in output
        async with httpx.AsyncClient(base_url=stack.url, timeout=10) as http:
            job = await wait_terminal(http, await submit(http, messages=CHAT, max_tokens=5))
            assert job["status"] == "completed"

            tokenizer = stack.pids["tokenizer"]
            os.kill(tokenizer, signal.SIGKILL)

            async def restarted() -> bool:
                return stack.pids["tokenizer"] != tokenizer

            await eventually(restarted, timeout=30)
            assert "tokenizer (pid" in "".join(stack.lines) and "restarting in" in "".join(stack.lines)
            started = time.monotonic()
            job = await wait_terminal(http, await submit(http, messages=CHAT, max_tokens=5), timeout=60)
            assert job["status"] == "completed", job
            assert time.monotonic() - started < 60
    assert (tmp_path / "cache" / "postgres" / "PG_VERSION").is_file()  # the ledger's data lives in the cache


def test_a_configured_postgres_that_does_not_answer_is_an_error(run_id: str, tiny_dir: Path) -> None:
    import subprocess
    import sys

    from tests.conftest import settings_env

    settings = make_settings(run_id, f"127.0.0.1:{free_port()}", tiny_dir, suffix="nopg", with_smollm2=False,
                             postgres_url=f"postgresql://postgres@127.0.0.1:{free_port()}/postgres")
    done = subprocess.run([sys.executable, "-m", "inferlog.cli", "up"], env=dict(os.environ, **settings_env(settings)),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "did not answer" in done.stderr and "never replaced" in done.stderr
    assert "embedded" not in done.stdout
