"""Batch producers (issue 11): a batch tier that never starves interactive work. With 2,000 batch lines in
flight (fed by ``inferlog submit``, then produced straight onto the topic), every interactive submit is
accepted (no 429, though the batch alone is far past the in-flight limit) and starts at once on the slots
and cache the worker keeps for it; its time to first token is measured against the same submits with no
batch running, alternated (baseline, batch, baseline, batch).

Speed targets live in ``bench/`` as medians; this test only guards against starvation, with a bound no
healthy run comes near (an interactive request queued behind the backlog waits for thousands of
generations, seconds to minutes): the measured TTFTs are printed and written beside the test's logs."""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import Producer

from tests.conftest import TINY, eventually, settings_env
from tests.faults.conftest import MakeCluster, start_pipeline
from tests.faults.harness import Cluster

pytestmark = pytest.mark.e2e

BATCH = 2_000
PROBES = 8
MAX_IN_FLIGHT = 300
STARVATION_RATIO = 4.0
"""Batch TTFT p50 over baseline p50 above which interactive work is waiting behind the batch (the issue's
target is 1.5, a figure for bench/: measured here and reported, not asserted on a shared 2-core machine)."""


def _batch_line(i: int) -> dict[str, Any]:
    return {"custom_id": f"b-{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": TINY, "messages": [{"role": "user", "content": f"Batch line {i}."}],
                     "max_tokens": 24, "temperature": 0}}


STAGES = ("received_at", "queued_at", "tokenized_at", "admitted_at", "first_token_at")
HOPS: list[dict[str, Any]] = []
"""Each probe's time between stages (ms): where a slower first token comes from."""


async def _probe(http: httpx.AsyncClient, key: str) -> float:
    """One interactive submit, polled to its end: its time to first token (received → first token)."""
    response = await http.post("/v1/requests", json={"messages": [{"role": "user", "content": "Quick one."}],
                                                     "max_tokens": 8, "ignore_eos": True},
                               headers={"Idempotency-Key": key})
    assert response.status_code == 202, response.text  # never a 429 beside a batch backlog
    for _ in range(20):
        job = (await http.get(f"/v1/requests/{key}", params={"wait": 30})).json()
        if job["status"] == "completed":
            t = job["timings"]
            hops = zip(STAGES, STAGES[1:], strict=False)
            HOPS.append({"probe": key, **{f"{a[:-3]}->{b[:-3]}": round((t[b] - t[a]) * 1000, 1)
                                          for a, b in hops if a in t and b in t}})
            return float(t["first_token_at"] - t["received_at"])
    raise AssertionError(f"{key} did not complete: {job}")


async def _round(cluster: Cluster, tag: str) -> list[float]:
    async with httpx.AsyncClient(base_url=cluster.url, timeout=40) as http:
        return [await _probe(http, f"{tag}-{i}") for i in range(PROBES)]


async def _open_jobs(cluster: Cluster) -> int:
    async with httpx.AsyncClient(base_url=cluster.url, timeout=10) as http:
        return int((await http.get("/readyz")).json()["in_flight"])


def _produce(bootstrap: str, topic: str, records: list[dict[str, Any]]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": False, "acks": "all",
                         "allow.auto.create.topics": False})
    for record in records:
        producer.produce(topic, key=record["request_id"], value=json.dumps(record))
    assert producer.flush(60) == 0


async def test_interactive_work_is_accepted_and_starts_at_once_beside_a_batch_backlog(
        make_cluster: MakeCluster, run_id: str, tmp_path: Path) -> None:
    cluster = await make_cluster("tiers", max_in_flight=MAX_IN_FLIGHT)
    start_pipeline(cluster)
    await cluster.wait_ready()
    settings = cluster.settings
    await _round(cluster, "warm")  # the first requests pay for cold paths: measured by nobody

    async def batch_running() -> bool:  # the worker's batch slots are full: a backlog, not a trickle
        load = await cluster.load("w")
        return int(load.get("running", 0)) >= 20

    baseline = await _round(cluster, "base-1")

    # Batch, fed by inferlog submit (2,000 lines, far past the in-flight limit of 300: fed as room frees).
    path = tmp_path / "batch.jsonl"
    path.write_text("".join(json.dumps(_batch_line(i)) + "\n" for i in range(BATCH)))
    submit = subprocess.Popen([sys.executable, "-m", "inferlog.cli", "submit", str(path), "--namespace",
                               f"t{run_id}", "--json"], env=dict(os.environ, **settings_env(settings)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    await eventually(batch_running, timeout=60, interval=0.1)
    beside = await _round(cluster, "cli")
    assert submit.poll() is None or await _open_jobs(cluster) > 0, "the batch ended before the probes: no test"
    out, err = await asyncio.to_thread(submit.communicate, timeout=300)
    assert submit.returncode == 0, err
    assert json.loads(out)["submitted"] == BATCH

    async def drained() -> bool:
        return await _open_jobs(cluster) == 0

    await eventually(drained, timeout=300, interval=1.0)
    baseline += await _round(cluster, "base-2")

    # Batch again, produced straight onto the topic (no admission on that path: the worker's reserve alone).
    records = [{"request_id": f"d{run_id}-{i}", "model": TINY, "priority": "batch", "params": {"max_tokens": 24},
                "messages": [{"role": "user", "content": f"Direct line {i}."}]} for i in range(BATCH)]
    await asyncio.to_thread(_produce, settings.kafka_bootstrap, cluster.topics.requests, records)
    await eventually(batch_running, timeout=60, interval=0.1)
    beside += await _round(cluster, "direct")
    assert await _open_jobs(cluster) > 0, "the direct batch ended before the probes: no test"

    ratio = statistics.median(beside) / statistics.median(baseline)
    figures = {"baseline_ttft_s": baseline, "beside_batch_ttft_s": beside, "p50_ratio": ratio, "hops_ms": HOPS}
    (tmp_path / "ttft.json").write_text(json.dumps(figures, indent=2))
    print(json.dumps({"baseline_p50_s": statistics.median(baseline), "beside_batch_p50_s": statistics.median(beside),
                      "p50_ratio": ratio}))
    assert ratio <= STARVATION_RATIO, figures
