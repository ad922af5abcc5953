"""Batch producers (issue 11): ``inferlog submit FILE.jsonl`` against the whole pipeline (tiny model). A
500-line file of OpenAI batch lines, the command killed half-way and run again, ends with 500 results and
500 generations (attempt events), no more; ``--wait --output`` writes 500 lines in input order, and a run
over the finished file submits nothing and writes the same lines. Bad lines are reported one by one while
the good ones are served."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    TINY,
    connect_to_schema,
    eventually,
    settings_env,
)
from tests.faults.conftest import MakeCluster, start_pipeline
from tests.faults.harness import check, describe

pytestmark = pytest.mark.e2e

LINES = 500


def _line(i: int, **body: Any) -> dict[str, Any]:
    return {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": TINY, "messages": [{"role": "user", "content": f"Line {i}."}], "max_tokens": 4,
                     "temperature": 0, **body}}


def _submit(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "inferlog.cli", "submit", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


async def _finish(proc: subprocess.Popen[str], timeout: float = 300) -> tuple[int, dict[str, Any], str]:
    out, err = await asyncio.to_thread(proc.communicate, timeout=timeout)
    try:
        return proc.returncode, json.loads(out), err
    except ValueError:
        raise AssertionError(f"exit {proc.returncode}: {out}\n{err}") from None


async def test_a_file_killed_half_way_and_submitted_again_runs_each_line_once(
        make_cluster: MakeCluster, run_id: str, tmp_path: Path) -> None:
    cluster = await make_cluster("submit")
    settings = cluster.settings
    start_pipeline(cluster)
    await cluster.wait_ready()
    env = dict(os.environ, **settings_env(settings))
    path = tmp_path / "requests.jsonl"
    path.write_text("".join(json.dumps(_line(i)) + "\n" for i in range(LINES)))
    namespace = f"n{run_id}"
    ids = [f"{namespace}.req-{i}" for i in range(LINES)]

    # Paced at 100 lines a second, 100 a round trip: killed once a few hundred are claimed.
    first = _submit(env, str(path), "--namespace", namespace, "--rate", "100", "--json")

    async def claimed() -> int:
        conn = await connect_to_schema(settings)
        try:
            return int(await conn.fetchval("SELECT count(*) FROM requests WHERE request_id LIKE $1",
                                           f"{namespace}.%"))
        finally:
            await conn.close()

    await eventually(lambda: _at_least(claimed, 150), timeout=60, interval=0.05)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    half = await claimed()
    assert 150 <= half < LINES, half

    output = tmp_path / "results.jsonl"
    code, report, err = await _finish(_submit(env, str(path), "--namespace", namespace, "--wait", "--timeout",
                                              "240", "--output", str(output), "--json"))
    assert code == 0, (report, err)
    assert report["lines"] == LINES and report["errors"] == [], report
    assert report["already_submitted"] >= 100 and report["submitted"] + report["already_submitted"] == LINES
    assert report["outcomes"] == {"completed": LINES}, report
    written = [json.loads(line) for line in output.read_text().splitlines()]
    assert [w["custom_id"] for w in written] == [f"req-{i}" for i in range(LINES)]  # input order
    assert all(w["error"] is None and w["response"]["status_code"] == 200 for w in written)
    assert {w["response"]["request_id"] for w in written} == set(ids)
    assert all(w["response"]["body"]["usage"]["completion_tokens"] == 4 for w in written)

    result = await check(settings, ids)
    assert result.lost == [] and result.conflicting == [], describe(result)
    assert result.generations == LINES and result.regenerated == [], describe(result)

    # The finished file again: nothing submitted, the same results written.
    again = tmp_path / "again.jsonl"
    code, report, err = await _finish(_submit(env, str(path), "--namespace", namespace, "--wait", "--output",
                                              str(again), "--json"))
    assert code == 0 and report["submitted"] == 0 and report["already_submitted"] == LINES, (report, err)
    assert again.read_text() == output.read_text()
    assert (await check(settings, ids)).generations == LINES

    # Bad lines, each reported by number; the good ones around them are served.
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_bytes(b"\n".join([
        json.dumps(_line(1)).encode(),
        b'{"custom_id": "broken", "body": ',
        json.dumps(_line(2, model="not-registered")).encode(),
        json.dumps(_line(3, messages=[{"role": "user", "content": "z" * 1_100_000}])).encode(),
        json.dumps(_line(1)).encode(),  # the same custom_id again
        json.dumps(_line(4)).encode(),
    ]) + b"\n")
    mixed_out = tmp_path / "mixed-results.jsonl"
    code, report, err = await _finish(_submit(env, str(mixed), "--namespace", f"m{run_id}", "--wait", "--output",
                                              str(mixed_out), "--json"))
    assert code == 3, (report, err)
    assert {e["line"]: e["code"] for e in report["errors"]} == {
        2: "invalid_json", 3: "model_not_found", 4: "line_too_large", 5: "duplicate_custom_id"}, report
    assert report["submitted"] == 2 and report["outcomes"] == {"completed": 2}, report
    written = [json.loads(line) for line in mixed_out.read_text().splitlines()]
    assert [w["error"]["code"] if w["error"] else "ok" for w in written] == [
        "ok", "invalid_json", "model_not_found", "line_too_large", "duplicate_custom_id", "ok"]


async def _at_least(count: Any, n: int) -> bool:
    return int(await count()) >= n
