"""What the log costs: the same requests through the whole stack vs. straight into the engine.

Baseline: ModelRunner (transformers' continuous batching manager) in this process. Pipeline: `inferlog up`
(gateway → requests → tokenizer → tokenized → worker → results → result-store → Postgres), submitted and
polled over HTTP. Rounds alternate baseline and pipeline; the report gives medians and the ratio
pipeline/baseline for output tokens per second, plus the pipeline's per-hop medians from the timings
every record carries.

    .venv/bin/python bench/pipeline_overhead.py [--requests 16] [--max-tokens 64] [--rounds 3] [--model tiny]

Writes bench/results/pipeline_overhead.json. Needs Postgres and Redis (as `make test`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from inferlog.config import DEFAULT_MODEL_NAME, InferlogSettings, ModelSpec  # noqa: E402
from inferlog.messages import ChatMessage  # noqa: E402
from inferlog.models import ModelRegistry, prepare  # noqa: E402
from inferlog.prompting import PromptFormatter  # noqa: E402
from inferlog.testing import build_tiny_llama  # noqa: E402
from inferlog_worker.runner import GenerationJob, ModelRunner  # noqa: E402

QUESTIONS = [
    "What is the capital of France?", "Name three primary colours.", "What is 12 times 12?",
    "Write a haiku about the sea.", "Why is the sky blue?", "Give me a synonym for happy.",
    "What does a compiler do?", "Translate 'good morning' into Spanish.",
]


def chats(n: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} (#{i})"}] for i in range(n)]


async def baseline(model_dir: Path, name: str, requests: int, max_tokens: int) -> dict[str, float]:
    from inferlog.models import RegisteredModel

    runner = ModelRunner(RegisteredModel(name, model_dir, None), device="cpu", num_blocks=128, page_size=64,
                         max_batch_tokens=512, sampling=True)
    await asyncio.to_thread(runner.load)
    formatter = PromptFormatter(model_dir)
    ids = formatter.encode_chats([[ChatMessage(**m) for m in chat] for chat in chats(requests)])
    await runner.submit(GenerationJob("warm", ids[0], 4))
    started = time.perf_counter()
    done = await asyncio.gather(*(runner.submit(GenerationJob(f"b{i}", x, max_tokens, ignore_eos=True))
                                  for i, x in enumerate(ids)))
    elapsed = time.perf_counter() - started
    await asyncio.to_thread(runner.stop)
    tokens = sum(len(d.token_ids) for d in done)
    return {"tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed}


async def pipeline(url: str, requests: int, max_tokens: int) -> dict[str, float]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        started = time.perf_counter()
        ids = []
        for chat in chats(requests):
            r = await http.post("/v1/requests", json={"messages": chat, "max_tokens": max_tokens,
                                                      "ignore_eos": True})
            r.raise_for_status()
            ids.append(r.json()["id"])
        jobs: dict[str, dict] = {}
        while len(jobs) < len(ids):
            for rid in ids:
                if rid not in jobs:
                    job = (await http.get(f"/v1/requests/{rid}")).json()
                    if job["status"] in ("completed", "failed", "cancelled", "expired"):
                        jobs[rid] = job
            await asyncio.sleep(0.25)  # polling harder steals the worker's CPU on a 2-core machine
        elapsed = time.perf_counter() - started
    tokens = sum(j["result"]["usage"]["completion_tokens"] for j in jobs.values() if j["result"])
    t = [j["timings"] for j in jobs.values()]
    hop = lambda a, b: statistics.median(x[b] - x[a] for x in t) * 1000  # noqa: E731
    return {"tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed,
            "gateway_ms": hop("received_at", "queued_at"), "to_tokenized_ms": hop("queued_at", "tokenized_at"),
            "to_admitted_ms": hop("tokenized_at", "admitted_at"),
            "ttft_ms": hop("received_at", "first_token_at")}


async def _drop_schema(schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(InferlogSettings().postgres_url)
    await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    await conn.close()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="smollm2")
    args = parser.parse_args()

    smol = prepare(ModelRegistry(InferlogSettings()).get(DEFAULT_MODEL_NAME)).directory
    if args.model == "tiny":
        model_dir = build_tiny_llama(Path(tempfile.mkdtemp()) / "tiny", smol)
        name, spec = "tiny", ModelSpec(name="tiny", path=str(model_dir))
    else:
        model_dir, name, spec = smol, DEFAULT_MODEL_NAME, ModelSpec(name=DEFAULT_MODEL_NAME)
    tag = f"bench{uuid.uuid4().hex[:8]}"
    port = 18000 + os.getpid() % 1000
    env = dict(os.environ, INFERLOG_TOPIC_PREFIX=tag, INFERLOG_POSTGRES_SCHEMA=tag, INFERLOG_REDIS_PREFIX=tag,
               INFERLOG_KAFKA_BOOTSTRAP=f"127.0.0.1:{port + 1}", INFERLOG_GATEWAY_PORT=str(port),
               INFERLOG_MODELS=json.dumps([spec.model_dump(exclude_none=True)]), INFERLOG_DEFAULT_MODEL=name,
               INFERLOG_LOG_LEVEL="WARNING")
    base_runs, pipe_runs = [], []
    for round_no in range(args.rounds):
        base_runs.append(asyncio.run(baseline(model_dir, name, args.requests, args.max_tokens)))
        log_path = Path(tempfile.mkstemp(suffix=".log")[1])
        with log_path.open("w") as log:  # a file, not a pipe: an undrained pipe would block the services
            stack = subprocess.Popen([sys.executable, "-m", "inferlog.cli", "up"], env=env, stdout=log,
                                     stderr=subprocess.STDOUT)
        try:
            while "inferlog is up" not in log_path.read_text():
                if stack.poll() is not None:
                    raise RuntimeError("inferlog up failed:\n" + log_path.read_text()[-4000:])
                time.sleep(0.2)
            pipe_runs.append(asyncio.run(pipeline(f"http://127.0.0.1:{port}", args.requests, args.max_tokens)))
        finally:
            stack.terminate()
            stack.wait(60)
            log_path.unlink()
        print(f"round {round_no}: baseline {base_runs[-1]['tokens_per_s']:.1f} tok/s, "
              f"pipeline {pipe_runs[-1]['tokens_per_s']:.1f} tok/s", flush=True)

    med = lambda runs, k: statistics.median(r[k] for r in runs)  # noqa: E731
    report = {
        "settings": {"model": name, "requests": args.requests, "max_tokens": args.max_tokens,
                     "rounds": args.rounds, "num_blocks": 128, "page_size": 64, "max_batch_tokens": 512,
                     "sampling": True, "device": "cpu", "cores": os.cpu_count()},
        "baseline_tokens_per_s": med(base_runs, "tokens_per_s"),
        "pipeline_tokens_per_s": med(pipe_runs, "tokens_per_s"),
        "ratio_pipeline_over_baseline": med(pipe_runs, "tokens_per_s") / med(base_runs, "tokens_per_s"),
        "pipeline_hops_ms": {k: med(pipe_runs, k) for k in ("gateway_ms", "to_tokenized_ms", "to_admitted_ms",
                                                            "ttft_ms")},
        "rounds": {"baseline": base_runs, "pipeline": pipe_runs},
    }
    asyncio.run(_drop_schema(tag))
    out = ROOT / "bench" / "results" / "pipeline_overhead.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "rounds"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
