"""Backends behind HTTP, each started by the bench as its own processes: the peer server
(``transformers serve --continuous-batching``, OpenAI routes) and the inferlog pipeline (``inferlog up``:
gateway → requests → tokenizer → tokenized → worker → results → result-store), both streaming (TTFT is the
first streamed text)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from inferlog_bench.offering import Served, offer
from inferlog_bench.results import EngineSettings, Run
from inferlog_bench.workloads import Workload

TERMINAL = ("completed", "failed", "cancelled", "expired")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def process(argv: list[str], env: dict[str, str], ready: str, *, timeout: float = 300) -> Iterator[None]:
    """Run ``argv`` until the block ends; wait until ``ready`` (a URL that answers 200, or a line in its
    output) first. Output goes to a file, not a pipe: an undrained pipe would block the services."""
    log_path = Path(tempfile.mkstemp(suffix=".log")[1])
    with log_path.open("w") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not _ready(ready, log_path):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{argv[0]} {argv[1]} did not start:\n" + log_path.read_text()[-4000:])
            time.sleep(0.3)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log_path.unlink(missing_ok=True)


def _ready(ready: str, log_path: Path) -> bool:
    if not ready.startswith("http"):
        return ready in log_path.read_text()
    try:
        return httpx.get(ready, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


# -- the peer server ------------------------------------------------------------------------------------


@contextlib.contextmanager
def peer_server(model_dir: Path, engine: EngineSettings) -> Iterator[str]:
    port = free_port()
    argv = [str(Path(sys.executable).with_name("transformers")), "serve", str(model_dir), "--continuous-batching",
            "--device", engine.device, "--dtype", engine.dtype, "--host", "127.0.0.1", "--port", str(port),
            "--cb-block-size", str(engine.page_size), "--cb-num-blocks", str(engine.num_blocks),
            "--cb-max-batch-tokens", str(engine.max_batch_tokens), "--log-level", "warning"]
    env = dict(os.environ, OMP_NUM_THREADS=str(engine.threads), TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    with process(argv, env, f"http://127.0.0.1:{port}/health"):
        yield f"http://127.0.0.1:{port}"


async def peer_run(url: str, model_dir: Path, work: Workload, max_running: int) -> Run:
    """OpenAI chat completions, streamed; EOS ignored through a per-request generation config."""
    async with httpx.AsyncClient(base_url=url, timeout=None) as http:
        async def serve(i: int) -> Served:
            first, text, tokens = await _peer_one(http, model_dir, work.chats[i], work.max_tokens[i],
                                                  work.ignore_eos, work.temperature)
            return Served(tokens, text, None, first)

        # the warm-up batch also fixes the manager's shared config: greedy
        return await offer("peer-server", work, serve, slots=max_running, warm_count=max_running,
                           warm=lambda k: _peer_one(http, model_dir, work.chats[k % len(work)], 4, True, 0.0))


async def _peer_one(http: httpx.AsyncClient, model_dir: Path, chat: list[dict[str, str]], max_tokens: int,
                    ignore_eos: bool, temperature: float) -> tuple[float | None, str, int]:
    body: dict[str, Any] = {"model": str(model_dir), "messages": chat, "max_tokens": max_tokens, "stream": True,
                            "temperature": temperature, "stream_options": {"include_usage": True}}
    if ignore_eos:
        body["generation_config"] = json.dumps({"max_new_tokens": max_tokens, "eos_token_id": -1,
                                                "do_sample": temperature > 0, "temperature": temperature or 1.0})
    first, parts, tokens = None, [], 0
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices") or []:
                content = (choice.get("delta") or {}).get("content")
                if content:
                    first = first or time.perf_counter()
                    parts.append(content)
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
    return first, "".join(parts), tokens


# -- the inferlog pipeline --------------------------------------------------------------------------------


@contextlib.contextmanager
def pipeline(model_name: str, spec: dict[str, Any], engine: EngineSettings, tag: str) -> Iterator[str]:
    """``inferlog up`` on its own broker port, topic prefix, Postgres schema and Redis prefix."""
    port = free_port()
    env = dict(os.environ, INFERLOG_TOPIC_PREFIX=tag, INFERLOG_POSTGRES_SCHEMA=tag, INFERLOG_REDIS_PREFIX=tag,
               INFERLOG_KAFKA_BOOTSTRAP=f"127.0.0.1:{free_port()}", INFERLOG_GATEWAY_PORT=str(port),
               INFERLOG_MODELS=json.dumps([spec]), INFERLOG_DEFAULT_MODEL=model_name, INFERLOG_LOG_LEVEL="WARNING",
               INFERLOG_WORKER_MAX_RUNNING=str(engine.max_running), INFERLOG_WORKER_NUM_BLOCKS=str(engine.num_blocks),
               INFERLOG_WORKER_PAGE_SIZE=str(engine.page_size),
               INFERLOG_WORKER_MAX_BATCH_TOKENS=str(engine.max_batch_tokens),
               INFERLOG_WORKER_THREADS=str(engine.threads), INFERLOG_WORKER_DEVICE=engine.device)
    with process([sys.executable, "-m", "inferlog.cli", "up"], env, "inferlog is up"):
        yield f"http://127.0.0.1:{port}"


async def pipeline_run(url: str, work: Workload, max_running: int) -> Run:
    """Submitted over HTTP; each job's stream read from the submit on; the terminal result is its ``done``."""
    async with httpx.AsyncClient(base_url=url, timeout=None,
                                 limits=httpx.Limits(max_connections=None, max_keepalive_connections=64)) as http:
        warm, run_tag = uuid.uuid4().hex, uuid.uuid4().hex  # each run's own jobs (Idempotency-Keys)

        async def serve(i: int) -> Served:
            first, text, tokens = await _pipeline_one(http, work.chats[i], work.max_tokens[i], work.ignore_eos,
                                                      work.temperature, f"{run_tag}-{i}")
            return Served(tokens, text, None, first)

        # every request offered at once: the worker admits, as it would for a user
        return await offer("pipeline", work, serve, slots=None, warm_count=max_running,
                           warm=lambda k: _pipeline_one(http, work.chats[k % len(work)], 4, True, 0.0, f"{warm}-{k}"))


async def _pipeline_one(http: httpx.AsyncClient, chat: list[dict[str, str]], max_tokens: int, ignore_eos: bool,
                        temperature: float, key: str) -> tuple[float | None, str, int]:
    body = {"messages": chat, "max_tokens": max_tokens, "ignore_eos": ignore_eos, "temperature": temperature}
    response = await http.post("/v1/requests", json=body, headers={"Idempotency-Key": key})
    if response.status_code != 202:
        raise RuntimeError(f"pipeline: submit answered {response.status_code}: {response.text}")
    rid = response.json()["id"]
    first = None
    async with http.stream("GET", f"/v1/requests/{rid}/stream") as stream:
        event = ""
        async for line in stream.aiter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "delta" and json.loads(line[6:]).get("text"):
                first = first or time.perf_counter()
            elif line.startswith("data: ") and event == "done":
                break
    job = (await http.get(f"/v1/requests/{rid}", params={"wait": 60})).json()
    if job["status"] != "completed":
        raise RuntimeError(f"pipeline: {rid} ended {job['status']}: {job.get('error')}")
    return first, job["result"]["text"], int(job["result"]["usage"]["completion_tokens"])
