"""``inferlog up`` again after a stop: the in-memory broker log is gone, the ledger is not. The jobs only
that log held are re-driven before the URL is printed (or, with the re-drive off, wait for ``inferlog
redrive`` without holding admission slots), each generated once."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from inferlog.config import InferlogSettings
from tests.conftest import drop_schema, eventually, free_port, make_settings, settings_env
from tests.e2e.conftest import RunningStack, inferlog_up
from tests.faults.harness import check, describe, read_topic

pytestmark = pytest.mark.e2e

JOBS = 50
ENV = {"INFERLOG_WORKER_NUM_BLOCKS": "64"}


def _body(i: int) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": f"Request {i}."}], "max_tokens": 6, "ignore_eos": True}


async def _statuses(http: httpx.AsyncClient, ids: list[str]) -> list[str]:
    return [(await http.get(f"/v1/requests/{rid}")).json()["status"] for rid in ids]


def _said(stack: RunningStack, text: str) -> str | None:
    return next((line for line in stack.lines if text in line), None)


async def _strand(settings: InferlogSettings) -> list[str]:
    """``up``, the worker stopped (SIGSTOP), ``JOBS`` jobs accepted and tokenized, ``up`` stopped with
    SIGTERM (the worker then killed: it never ran anything). Returns their IDs."""
    with inferlog_up(settings, extra_env=ENV) as first:
        worker = first.pids["gpu-worker"]
        os.kill(worker, signal.SIGSTOP)
        async with httpx.AsyncClient(base_url=first.url, timeout=10) as http:
            ids = []
            for i in range(JOBS):
                response = await http.post("/v1/requests", json=_body(i))
                assert response.status_code == 202, response.text
                ids.append(response.json()["id"])

            async def tokenized() -> bool:
                return set(await _statuses(http, ids)) == {"tokenized"}

            await eventually(tokenized, timeout=60, interval=0.5)
        events = await read_topic(settings, f"{settings.topic_prefix}.events.v1")
        assert not any(b'"gpu-worker"' in value and b'"running"' in value for _k, value in events), \
            "a stopped worker ran something"
        first.proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)  # `up` is stopping: it will not restart the worker it finds dead
        os.kill(worker, signal.SIGKILL)
    said = _said(first, "accepted jobs are unfinished")
    assert said is not None and said.startswith(f"{JOBS} accepted jobs are unfinished") and "re-drives them" in said, \
        "".join(first.lines[-20:])
    return ids


async def _finish(stack: RunningStack, ids: list[str]) -> None:
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as http:
        async def all_terminal() -> bool:
            return all(s in ("completed", "failed", "expired", "cancelled") for s in await _statuses(http, ids))

        await eventually(all_terminal, timeout=240, interval=1.0)
        assert set(await _statuses(http, ids)) == {"completed"}
    report = await check(stack.settings, ids)
    assert not report.lost and not report.conflicting, describe(report)
    assert report.generations_by_id == {rid: 1 for rid in ids}, describe(report)  # each generated once


async def test_up_again_re_drives_what_the_lost_log_held(run_id: str, tiny_dir: Path) -> None:
    settings = make_settings(run_id, f"127.0.0.1:{free_port()}", tiny_dir, suffix="restart")
    try:
        ids = await _strand(settings)
        with inferlog_up(settings, extra_env=ENV) as second:
            said = _said(second, "re-driven")
            assert said is not None and said.startswith(f"re-driven {JOBS} jobs from the previous run"), \
                "".join(second.lines)
            assert second.lines.index(said) < second.lines.index(_said(second, "inferlog is up"))  # type: ignore[arg-type]
            await _finish(second, ids)
    finally:
        await drop_schema(settings.postgres_schema)


async def test_with_the_re_drive_off_they_wait_for_redrive_and_block_nothing(run_id: str, tiny_dir: Path) -> None:
    settings = make_settings(run_id, f"127.0.0.1:{free_port()}", tiny_dir, suffix="restartoff")
    try:
        ids = await _strand(settings)
        limit = 10
        with inferlog_up(settings, extra_env={**ENV, "INFERLOG_REDRIVE_ON_UP": "false",
                                              "INFERLOG_MAX_IN_FLIGHT": str(limit)}) as second:
            said = _said(second, "wait for `inferlog redrive`")
            assert said is not None and said.startswith(f"{JOBS} accepted jobs from an earlier broker log"), \
                "".join(second.lines)
            assert _said(second, "re-driven") is None
            async with httpx.AsyncClient(base_url=second.url, timeout=10) as http:
                ready = (await http.get("/readyz")).json()
                assert ready["awaiting_redrive"] == JOBS, ready
                new = []
                for i in range(limit - 1):  # 50 open jobs, a limit of 10: still accepted
                    response = await http.post("/v1/requests", json=_body(1000 + i))
                    assert response.status_code == 202, response.text
                    new.append(response.json()["id"])
                assert set(await _statuses(http, ids)) == {"tokenized"}  # nothing ran them
            redrive = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-m", "inferlog.cli", "redrive", "--json"], capture_output=True, text=True,
                timeout=120, env=dict(os.environ, **settings_env(settings)))
            assert redrive.returncode == 0, redrive.stderr
            assert sorted(json.loads(redrive.stdout)["redriven"]) == sorted(ids), redrive.stdout
            await _finish(second, ids + new)
    finally:
        await drop_schema(settings.postgres_schema)
