"""One engine serves greedy and sampled requests side by side (``cb_shim.install_mixed_sampling``): greedy
rows are the argmax, sampled rows are sampled with their own temperature and top-p, in the same batch; a
step where every row is greedy does no sampling work at all."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from inferlog.models import RegisteredModel
from inferlog_worker.runner import GenerationDone, GenerationJob, ModelRunner

PROMPTS = {"a": [1, 2, 3, 4, 5], "b": [7, 8, 9], "c": [11, 12, 13, 14], "d": [20, 21]}
LENGTH = 24


@pytest.fixture
async def runner(tiny_dir: Path) -> AsyncIterator[ModelRunner]:
    runner = ModelRunner(RegisteredModel("tiny", tiny_dir, None), device="cpu", num_blocks=64, page_size=16,
                         max_batch_tokens=256)
    await asyncio.to_thread(runner.load)
    yield runner
    await asyncio.to_thread(runner.stop)


async def _run(runner: ModelRunner, jobs: list[GenerationJob]) -> dict[str, GenerationDone]:
    return {d.request_id: d for d in await asyncio.gather(*(runner.submit(job) for job in jobs))}


def _batch(tag: str, sampled: dict[str, float]) -> list[GenerationJob]:
    """The same batch shape every time (prompts, lengths, EOS ignored); the requests named in ``sampled``
    at that temperature, the rest greedy."""
    return [GenerationJob(f"{tag}-{name}", prompt, LENGTH, temperature=sampled.get(name, 0.0), ignore_eos=True)
            for name, prompt in PROMPTS.items()]


async def test_a_greedy_batch_runs_no_sampling_step(runner: ModelRunner) -> None:
    done = await _run(runner, _batch("greedy", {}))
    assert all(len(d.token_ids) == LENGTH for d in done.values())
    steps = runner.sampling_steps()
    assert steps["sampled"] == 0 and steps["greedy"] >= LENGTH, steps


async def test_greedy_rows_of_a_mixed_batch_match_an_all_greedy_batch(runner: ModelRunner) -> None:
    reference = await _run(runner, _batch("ref", {}))
    assert runner.sampling_steps()["sampled"] == 0
    mixed = await _run(runner, _batch("mixed", {"b": 1.5, "d": 2.0}))
    assert runner.sampling_steps()["sampled"] >= LENGTH - 1  # the sampled rows ran through the sampling step
    for name in ("a", "c"):  # greedy in both runs: the same tokens, whatever their neighbours did
        assert mixed[f"mixed-{name}"].token_ids == reference[f"ref-{name}"].token_ids, name
    for name in ("b", "d"):  # sampled at temperature >= 1.5 over a ~49k vocabulary: they leave the argmax
        assert len(mixed[f"mixed-{name}"].token_ids) == LENGTH
        assert mixed[f"mixed-{name}"].token_ids != reference[f"ref-{name}"].token_ids, name


async def test_per_request_temperature_and_top_p(runner: ModelRunner) -> None:
    prompt = PROMPTS["a"]
    jobs = [GenerationJob("greedy", prompt, LENGTH, ignore_eos=True),
            # top-p so small that only the most likely token is left: sampling must pick the argmax
            GenerationJob("narrow", prompt, LENGTH, temperature=1.0, top_p=1e-6, ignore_eos=True),
            GenerationJob("hot", prompt, LENGTH, temperature=2.0, ignore_eos=True),
            GenerationJob("hot-2", prompt, LENGTH, temperature=2.0, ignore_eos=True)]
    done = await _run(runner, jobs)
    assert all(len(d.token_ids) == LENGTH and d.finish_reason == "length" for d in done.values())
    assert all(0 <= t < runner.vocab_size for d in done.values() for t in d.token_ids)
    assert done["narrow"].token_ids == done["greedy"].token_ids
    # Each sampled row is sampled on its own: neither follows the argmax, nor each other.
    assert done["hot"].token_ids != done["greedy"].token_ids
    assert done["hot"].token_ids != done["hot-2"].token_ids


async def test_a_vanishing_temperature_samples_without_nan(runner: ModelRunner) -> None:
    """1e-40 is a float32 above 0: the row is sampled, and dividing raw logits by it would overflow to inf
    and NaN in softmax (the engine's thread would crash). Relative to the row's top it is the argmax."""
    prompt = PROMPTS["a"]
    done = await _run(runner, [GenerationJob("greedy", prompt, LENGTH, ignore_eos=True),
                               GenerationJob("cold", prompt, LENGTH, temperature=1e-40, ignore_eos=True)])
    assert runner.sampling_steps()["sampled"] >= LENGTH - 1
    assert done["cold"].finish_reason == "length" and done["cold"].token_ids == done["greedy"].token_ids


async def test_a_stale_temperature_never_samples_a_greedy_batch(runner: ModelRunner) -> None:
    """transformers fills the arguments only for requests with a new token; a long prompt still in chunked
    prefill (400 tokens, 256 a step) has a logits row but no column written: it must read greedy, not the
    temperature an earlier step's sampled request left there."""
    await _run(runner, _batch("hot", dict.fromkeys(PROMPTS, 2.0)))
    before = runner.sampling_steps()["sampled"]
    jobs = [GenerationJob("short-1", PROMPTS["a"], 8, ignore_eos=True),
            GenerationJob("short-2", PROMPTS["b"], 8, ignore_eos=True),
            GenerationJob("long", [1 + k % 300 for k in range(400)], 8, ignore_eos=True)]
    done = await _run(runner, jobs)
    assert all(len(d.token_ids) == 8 for d in done.values())
    assert runner.sampling_steps()["sampled"] == before
