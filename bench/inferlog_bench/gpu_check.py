"""``bench/gpu_check.sh``: direct continuous batching (transformers' manager) and the worker's engine adapter
(``ModelRunner``) on randomly initialised Llamas — SmolLM2-135M's config and a ~1B one — printing output
tokens/s and ms per engine step at batch 1, 16, 64 and 256 (CUDA, bf16). ``--tiny`` runs a tiny config on
the CPU at batch 1 and 4, so the script cannot rot (``make test``). It first prints the library versions
and runs the engine shim's pin checks (``tests/unit/test_cb_shim.py``) against the transformers it runs on.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CONFIGS: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
                         rms_norm_eps=1e-5, tie_word_embeddings=True),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                     tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True),
}
PROMPT_TOKENS = 32
PAGE_SIZE = 64


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/gpu_check.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="the tiny config on the CPU, batch 1 and 4")
    p.add_argument("--assets", type=Path, default=None,
                   help="a directory with SmolLM2's config.json and tokenizer files (default: the prepared model)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)

    import torch
    import transformers

    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__,
                "cuda": str(torch.version.cuda), "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu"}
    print(" ".join(f"{k}={v}" for k, v in versions.items()), flush=True)
    pins = _pin_checks()
    print(f"engine shim pins: {pins}", flush=True)

    configs, batches, new_tokens = (["tiny"], [1, 4], 16) if args.tiny else (["smollm2-135m", "llama-1b"],
                                                                              [1, 16, 64, 256], 64)
    assets = args.assets or _prepared_smollm2()
    rows = []
    for name in configs:
        model_dir = _random_model(name, assets)
        for batch in batches:
            for backend in ("direct", "adapter"):
                row = _measure(backend, model_dir, device, batch, new_tokens)
                rows.append({"model": name, **row})
                print(f"{name:13} {backend:8} batch {batch:4d}: {row['tokens_per_s']:9.1f} tok/s "
                      f"{row['ms_per_step']:8.2f} ms/step ({row['tokens']} tokens, {row['steps']} steps)", flush=True)
    report = {"versions": versions, "pins": pins, "device": device, "prompt_tokens": PROMPT_TOKENS,
              "new_tokens": new_tokens, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return 0 if pins == "ok" else 1


def _pin_checks() -> str:
    """The shim's pin tests, run as plain functions (no pytest needed on the machine)."""
    try:
        module = importlib.import_module("tests.unit.test_cb_shim")
        for name in dir(module):
            if name.startswith("test_"):
                getattr(module, name)()
    except AssertionError as exc:
        return f"FAILED: {exc}"
    return "ok"


def _prepared_smollm2() -> Path:
    from inferlog.config import DEFAULT_MODEL_NAME, InferlogSettings
    from inferlog.models import ModelRegistry, prepare

    return prepare(ModelRegistry(InferlogSettings()).get(DEFAULT_MODEL_NAME)).directory


def _random_model(name: str, assets: Path) -> Path:
    from inferlog.testing import build_random_llama

    return build_random_llama(Path(tempfile.gettempdir()) / f"inferlog-gpu-check-{name}", assets, **CONFIGS[name])


def _measure(backend: str, model_dir: Path, device: str, batch: int, new_tokens: int) -> dict[str, Any]:
    num_blocks = math.ceil(batch * (PROMPT_TOKENS + new_tokens) / PAGE_SIZE) + batch + 4
    max_batch_tokens = 2048 if device == "cuda" else 512
    prompts = [[1 + (i * 7 + k) % 1000 for k in range(PROMPT_TOKENS)] for i in range(batch)]
    if backend == "direct":
        return _direct(model_dir, device, prompts, new_tokens, num_blocks, max_batch_tokens)
    return asyncio.run(_adapter(model_dir, device, prompts, new_tokens, num_blocks, max_batch_tokens))


def _direct(model_dir: Path, device: str, prompts: list[list[int]], new_tokens: int, num_blocks: int,
            max_batch_tokens: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.generation import ContinuousBatchingConfig

    from inferlog_worker import cb_shim

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()  # type: ignore[arg-type]
    manager = model.init_continuous_batching(
        generation_config=GenerationConfig(max_new_tokens=new_tokens, eos_token_id=-1, pad_token_id=0,
                                           do_sample=False),
        continuous_batching_config=ContinuousBatchingConfig(num_blocks=num_blocks, page_size=PAGE_SIZE,
                                                            max_batch_tokens=max_batch_tokens, max_queue_size=0))
    manager.start()
    try:
        def run(tag: str, count: int) -> int:
            for i, prompt in enumerate(prompts):
                manager.add_request(prompt, request_id=f"{tag}{i}", max_new_tokens=count, streaming=False,
                                    eos_token_id=-1)
            tokens = 0
            for _ in prompts:
                output = manager.get_result(timeout=300)
                if output is None or output.error:
                    raise RuntimeError(f"direct: {output.error if output else 'no result in 300 s'}")
                tokens += len(output.generated_tokens)
            return tokens

        run("warm", 4)
        steps = cb_shim.steps_completed(manager)
        started = time.perf_counter()
        tokens = run("r", new_tokens)
        elapsed = time.perf_counter() - started
        steps = cb_shim.steps_completed(manager) - steps
    finally:
        manager.stop(block=True, timeout=60)
    return _row("direct", len(prompts), tokens, elapsed, steps)


async def _adapter(model_dir: Path, device: str, prompts: list[list[int]], new_tokens: int, num_blocks: int,
                   max_batch_tokens: int) -> dict[str, Any]:
    from inferlog.models import RegisteredModel
    from inferlog_worker.runner import GenerationJob, ModelRunner

    runner = ModelRunner(RegisteredModel("gpu-check", model_dir, None), device=device, num_blocks=num_blocks,
                         page_size=PAGE_SIZE, max_batch_tokens=max_batch_tokens)
    await asyncio.to_thread(runner.load)
    try:
        async def run(tag: str, count: int) -> int:
            done = await asyncio.gather(*(runner.submit(GenerationJob(f"{tag}{i}", prompt, count, ignore_eos=True))
                                          for i, prompt in enumerate(prompts)))
            failed = [d.error for d in done if d.finish_reason == "error"]
            if failed:
                raise RuntimeError(f"adapter: {failed[0]}")
            return sum(len(d.token_ids) for d in done)

        await run("warm", 4)
        steps = runner.steps()
        started = time.perf_counter()
        tokens = await run("r", new_tokens)
        elapsed = time.perf_counter() - started
        steps = runner.steps() - steps
    finally:
        await asyncio.to_thread(runner.stop)
    return _row("adapter", len(prompts), tokens, elapsed, steps)


def _row(backend: str, batch: int, tokens: int, elapsed: float, steps: int) -> dict[str, Any]:
    return {"backend": backend, "batch": batch, "tokens": tokens, "seconds": elapsed, "steps": steps,
            "tokens_per_s": tokens / elapsed, "ms_per_step": elapsed * 1000 / max(1, steps)}


if __name__ == "__main__":
    sys.exit(main())
