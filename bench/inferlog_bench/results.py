"""What a bench run writes: per backend and workload, the runs' figures and their medians (JSON)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from pydantic import BaseModel, Field


@dataclass
class RequestRun:
    tokens: int
    text: str | None
    token_ids: list[int] | None
    ttft_s: float
    """From the request's offer to its first output token."""
    done_s: float
    """From the run's start to the request's terminal result."""


@dataclass
class Run:
    backend: str
    workload: str
    elapsed_s: float
    """From the first offer (submit, add_request) to the last terminal result."""
    requests: list[RequestRun]

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.requests)

    def summary(self) -> RunSummary:
        ttft = sorted(r.ttft_s for r in self.requests)
        return RunSummary(tokens=self.tokens, elapsed_s=self.elapsed_s, tokens_per_s=self.tokens / self.elapsed_s,
                          ttft_p50_s=_quantile(ttft, 0.5), ttft_p90_s=_quantile(ttft, 0.9))


def _quantile(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


class RunSummary(BaseModel):
    tokens: int = Field(ge=0)
    elapsed_s: float = Field(gt=0)
    tokens_per_s: float = Field(ge=0)
    ttft_p50_s: float = Field(ge=0)
    ttft_p90_s: float = Field(ge=0)


class Cell(BaseModel):
    """One backend on one workload: every round, and their medians."""

    backend: str
    workload: str
    rate: float | None = None
    rounds: list[RunSummary] = Field(min_length=1)
    tokens_per_s: float = Field(ge=0)
    ttft_p50_s: float = Field(ge=0)
    ttft_p90_s: float = Field(ge=0)
    identical_to_direct: int | None = None
    """Requests whose output equals direct continuous batching's (token IDs, or text over HTTP)."""

    @classmethod
    def of(cls, backend: str, workload: str, rate: float | None, rounds: list[RunSummary]) -> Cell:
        med = lambda key: statistics.median(getattr(r, key) for r in rounds)  # noqa: E731
        return cls(backend=backend, workload=workload, rate=rate, rounds=rounds, tokens_per_s=med("tokens_per_s"),
                   ttft_p50_s=med("ttft_p50_s"), ttft_p90_s=med("ttft_p90_s"))


class EngineSettings(BaseModel):
    """The same for every backend: direct, the engine adapter, the peer server and the pipeline's worker."""

    max_running: int
    num_blocks: int
    page_size: int
    max_batch_tokens: int
    threads: int
    device: str = "cpu"
    dtype: str = "float32"


class BenchReport(BaseModel):
    git_sha: str
    started_at: float
    model: str
    model_dir: str
    smoke: bool
    rounds: int
    versions: dict[str, str]
    cores: int
    engine: EngineSettings
    workloads: dict[str, dict[str, object]]
    cells: list[Cell] = Field(min_length=1)
    ratios: dict[str, float]
    """The targets' ratios (medians of alternating rounds), e.g. pipeline over direct at saturation."""
    max_rate_ttft_p90_2s: dict[str, float | None]
    """Per backend: the highest spread arrival rate at which TTFT p90 stayed at or under 2 s."""
    notes: list[str]
