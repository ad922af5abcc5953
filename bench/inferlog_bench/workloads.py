"""The bench's fixed workloads: the same chats, lengths and arrival times for every backend."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

QUESTIONS = [
    "What is the capital of France?", "Name three primary colours.", "What is 12 times 12?",
    "Write a haiku about the sea.", "Why is the sky blue?", "Give me a synonym for happy.",
    "What does a compiler do?", "Translate 'good morning' into Spanish.", "How many legs does a spider have?",
    "What is photosynthesis?", "Suggest a name for a black cat.", "What is the boiling point of water?",
    "Explain gravity to a child.", "List three fruits that are red.", "What is a prime number?",
    "Who wrote Romeo and Juliet?", "Describe a rainbow in one sentence.", "What is the largest planet?",
    "How do bees make honey?", "What is the opposite of cold?", "Give a tip for staying focused.",
    "What language is spoken in Brazil?", "Why do leaves change colour in autumn?", "What is an atom?",
]
"""The saturation workload's 24 prompts (one user message each)."""

Chat = list[dict[str, str]]


@dataclass(frozen=True)
class Workload:
    """Requests as every backend sees them: chats (HTTP backends render them with the model's chat
    template) and their token IDs (in-process backends), each with its length and arrival time."""

    name: str
    chats: list[Chat]
    max_tokens: list[int]
    arrivals: list[float]
    """Seconds after the run starts at which each request is offered (all 0: all at once)."""
    ignore_eos: bool
    temperature: float = 0.0
    rate: float | None = None
    """Requests per second of a Poisson arrival process (None: all offered at once)."""
    prompts: list[list[int]] = field(default_factory=list)
    """The chats' token IDs (set by the bench from the model's chat template)."""

    def __len__(self) -> int:
        return len(self.chats)

    def with_prompts(self, prompts: list[list[int]]) -> Workload:
        return Workload(self.name, self.chats, self.max_tokens, self.arrivals, self.ignore_eos, self.temperature,
                        self.rate, prompts)


def chats(n: int) -> list[Chat]:
    """n chats over the 24 questions; repeats carry their round number (so no two are the same text)."""
    return [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)] + (f" ({i // len(QUESTIONS)})"
                                                                          if i >= len(QUESTIONS) else "")}]
            for i in range(n)]


def saturation(n: int = 24, max_tokens: int = 64, *, ignore_eos: bool = False, temperature: float = 0.0,
               name: str = "saturation") -> Workload:
    """n chats offered at once, each up to max_tokens (greedy, EOS honoured unless ignore_eos)."""
    return Workload(name, chats(n), [max_tokens] * n, [0.0] * n, ignore_eos, temperature)


def single(i: int, max_tokens: int) -> Workload:
    """Request i alone (the low-load runs: one request at a time, streaming, EOS ignored)."""
    return Workload("low-load", chats(i + 1)[i:], [max_tokens], [0.0], True)


def spread(n: int, rate: float, *, median: int = 48, sigma: float = 0.8, cap: int = 160, seed: int = 0) -> Workload:
    """n requests with lognormal output lengths (median, sigma, capped; EOS ignored) and Poisson arrivals at
    ``rate`` per second. The same seed gives the same lengths at every rate, and arrival gaps that scale."""
    rng = random.Random(seed)
    lengths = [max(1, min(cap, round(rng.lognormvariate(math.log(median), sigma)))) for _ in range(n)]
    gaps = random.Random(seed + 1)
    t, arrivals = 0.0, []
    for _ in range(n):
        arrivals.append(t)
        t += gaps.expovariate(rate)
    return Workload(f"spread@{rate:g}", chats(n), lengths, arrivals, True, rate=rate)
