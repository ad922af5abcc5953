"""In-process backends on one set of weights: naive ``generate`` one request at a time, static batching
(batches of B that wait for their longest member), transformers' continuous batching manager (greedy, as a
user would run it), and inferlog's engine adapter (``ModelRunner``: the same manager with the worker's
shim, mixed greedy/sampled steps).

Each backend runs in a fresh process of its own (``python -m inferlog_bench.engines``), as the servers do:
measured in one long-lived process after ``generate`` had run, the manager ran at ~55 % of its speed in a
fresh one (36 vs 65 tokens/s, saturation), which would have flattered every other backend."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, GenerationConfig
from transformers.generation import ContinuousBatchingConfig
from transformers.generation.streamers import BaseStreamer

from inferlog.models import RegisteredModel
from inferlog_bench.offering import Served, offer, perf_time_of
from inferlog_bench.results import EngineSettings, RequestRun, Run
from inferlog_bench.workloads import Workload
from inferlog_worker.runner import GenerationJob, ModelRunner


def load(model_dir: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def eos_of(model: Any) -> int:
    eos = model.generation_config.eos_token_id
    return int(eos[0] if isinstance(eos, list) else eos)


class _FirstToken(BaseStreamer):
    """``generate``'s streamer: its first ``put`` is the prompt, the second the first new tokens."""

    def __init__(self) -> None:
        self.puts = 0
        self.at: float | None = None

    def put(self, value: Any) -> None:
        self.puts += 1
        if self.puts == 2:
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


def warm_prompts(work: Workload, batch: int) -> list[list[int]]:
    """A warm-up batch: the first run of a batched prefill costs seconds more than later ones (measured:
    16 prompts x 32 tokens, cold 17 tokens/s, warm 50), so every backend is warmed with one of its own."""
    return [work.prompts[k % len(work)] for k in range(batch)]


def static(model: Any, work: Workload, batch: int, name: str) -> Run:
    """Batches of up to ``batch`` requests from those that have arrived, left-padded, each batch generating
    until its longest member is done (batch 1 is naive generation)."""
    eos = eos_of(model)
    n = len(work)
    done: dict[int, RequestRun] = {}
    started = time.perf_counter()
    pending = list(range(n))
    while pending:
        wait = work.arrivals[pending[0]] - (time.perf_counter() - started)
        if wait > 0:
            time.sleep(wait)
        now = time.perf_counter() - started
        take = [i for i in pending if work.arrivals[i] <= now][:batch]
        pending = [i for i in pending if i not in take]
        width = max(len(work.prompts[i]) for i in take)
        ids = torch.tensor([[eos] * (width - len(work.prompts[i])) + work.prompts[i] for i in take])
        mask = torch.tensor([[0] * (width - len(work.prompts[i])) + [1] * len(work.prompts[i]) for i in take])
        longest = max(work.max_tokens[i] for i in take)
        streamer = _FirstToken()
        options: dict[str, Any] = dict(max_new_tokens=longest, do_sample=work.temperature > 0, pad_token_id=eos)
        if work.temperature > 0:
            options.update(temperature=work.temperature, top_p=1.0, top_k=0)
        if work.ignore_eos:
            options["min_new_tokens"] = longest  # EOS never ends a request (it is masked until the end)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, streamer=streamer, **options)
        ended = time.perf_counter() - started
        for row, i in enumerate(take):
            tokens = out[row, width:].tolist()[: work.max_tokens[i]]
            if not work.ignore_eos and eos in tokens:
                tokens = tokens[: tokens.index(eos) + 1]  # as the engine counts it: the EOS is generated
            first = (streamer.at or time.perf_counter()) - started
            done[i] = RequestRun(len(tokens), None, tokens, first - work.arrivals[i], ended)
    return Run(name, work.name, max(r.done_s for r in done.values()), [done[i] for i in range(n)])


def direct(model: Any, work: Workload, engine: EngineSettings) -> Run:
    """transformers' continuous batching manager in this process, greedy (or sampling, for a sampled
    workload) as a user would run it, at most ``max_running`` requests in it at once (as the worker admits).
    Outputs come back through ``register_result_handler`` (one loop callback per step, as ``transformers
    serve`` does): a thread waiting on ``get_result`` wakes once per request per step, and measured here that
    contention cost the engine a third of its throughput."""
    return asyncio.run(_direct(model, work, engine))


async def _direct(model: Any, work: Workload, engine: EngineSettings) -> Run:
    eos = eos_of(model)
    sampled = work.temperature > 0
    generation = GenerationConfig(max_new_tokens=256, eos_token_id=eos, pad_token_id=eos, do_sample=sampled,
                                  **(dict(temperature=work.temperature, top_p=1.0, top_k=0) if sampled else {}))
    config = ContinuousBatchingConfig(num_blocks=engine.num_blocks, page_size=engine.page_size,
                                      max_batch_tokens=engine.max_batch_tokens, max_queue_size=0)
    manager = model.init_continuous_batching(generation_config=generation, continuous_batching_config=config)
    manager.start()
    loop = asyncio.get_running_loop()

    async def generate(request_id: str, prompt: list[int], max_tokens: int) -> tuple[list[int], float]:
        """The request's tokens and when its first one came (perf_counter)."""
        finished: asyncio.Future[list[int]] = loop.create_future()
        first: list[float] = []

        def on_output(output: Any) -> None:
            if output.generated_tokens and not first:
                first.append(time.perf_counter())
            if output.error and not finished.done():
                finished.set_exception(RuntimeError(f"direct: {request_id} failed: {output.error}"))
            elif output.is_finished() and not finished.done():
                finished.set_result(list(output.generated_tokens))

        manager.register_result_handler(request_id, on_output)
        manager.add_request(prompt, request_id=request_id, max_new_tokens=max_tokens, streaming=True,
                            eos_token_id=-1 if work.ignore_eos else eos)
        tokens = await finished
        return tokens, first[0] if first else time.perf_counter()

    async def serve(i: int) -> Served:
        tokens, first = await generate(f"r{i}", work.prompts[i], work.max_tokens[i])
        return Served(len(tokens), None, tokens, first)

    warm = warm_prompts(work, engine.max_running)
    try:
        return await offer("direct", work, serve, slots=engine.max_running, warm_count=len(warm),
                           warm=lambda k: generate(f"warm{k}", warm[k], 4))
    finally:
        await asyncio.to_thread(manager.stop, block=True, timeout=30)


def adapter(model_dir: Path, work: Workload, engine: EngineSettings) -> Run:
    """inferlog's engine adapter (the worker's ``ModelRunner``), in this process, without the log."""
    return asyncio.run(_adapter(model_dir, work, engine))


async def _adapter(model_dir: Path, work: Workload, engine: EngineSettings) -> Run:
    runner = ModelRunner(RegisteredModel("bench", model_dir, None), device="cpu", num_blocks=engine.num_blocks,
                         page_size=engine.page_size, max_batch_tokens=engine.max_batch_tokens,
                         threads=engine.threads)
    await asyncio.to_thread(runner.load)

    async def serve(i: int) -> Served:
        d = await runner.submit(GenerationJob(f"r{i}", work.prompts[i], work.max_tokens[i],
                                              temperature=work.temperature, ignore_eos=work.ignore_eos))
        if d.finish_reason == "error":
            raise RuntimeError(f"adapter: request {i} failed: {d.error}")
        return Served(len(d.token_ids), d.text, list(d.token_ids),
                      perf_time_of(d.first_token_at) if d.first_token_at else None)

    warm = warm_prompts(work, engine.max_running)
    try:
        return await offer("adapter", work, serve, slots=engine.max_running, warm_count=len(warm),
                           warm=lambda k: runner.submit(GenerationJob(f"warm{k}", warm[k], 4, ignore_eos=True)))
    finally:
        await asyncio.to_thread(runner.stop)


def run_in_process(backend: str, model_dir: Path, works: list[Workload], engine: EngineSettings,
                   static_batch: int) -> list[Run]:
    """Every workload of one in-process backend, in a fresh process of its own."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        given, taken = Path(tmp) / "in.json", Path(tmp) / "out.json"
        given.write_text(json.dumps({"backend": backend, "model_dir": str(model_dir), "static_batch": static_batch,
                                     "engine": engine.model_dump(),
                                     "works": [dataclasses.asdict(w) for w in works]}))
        subprocess.run([sys.executable, "-m", "inferlog_bench.engines", str(given), str(taken)], check=True)
        return [Run(r["backend"], r["workload"], r["elapsed_s"], [RequestRun(**q) for q in r["requests"]])
                for r in json.loads(taken.read_text())]


def _child(given: Path, taken: Path) -> None:
    spec = json.loads(given.read_text())
    backend, model_dir = spec["backend"], Path(spec["model_dir"])
    engine = EngineSettings(**spec["engine"])
    works = [Workload(**w) for w in spec["works"]]
    torch.set_num_threads(engine.threads)
    if backend == "adapter":
        runs = [adapter(model_dir, w, engine) for w in works]
    else:
        model = load(model_dir)
        if backend == "direct":
            runs = [direct(model, w, engine) for w in works]
        else:
            batch = 1 if backend == "naive" else spec["static_batch"]
            first = works[0]
            warm = Workload("warm-up", [first.chats[0]] * batch, [4] * batch, [0.0] * batch, True,
                            prompts=warm_prompts(first, batch))
            static(model, warm, batch, backend)
            runs = [static(model, w, batch, backend) for w in works]
    taken.write_text(json.dumps([dataclasses.asdict(r) for r in runs]))


if __name__ == "__main__":
    _child(Path(sys.argv[1]), Path(sys.argv[2]))
