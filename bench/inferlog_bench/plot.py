"""The bench's PNG: output tokens/s and TTFT by backend and load."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from inferlog_bench.results import BenchReport  # noqa: E402


def plot(report: BenchReport, out: Path) -> None:
    fig, (bars, rate_tps, rate_ttft) = plt.subplots(1, 3, figsize=(16, 5))
    fixed = [c for c in report.cells if c.rate is None and c.workload != "low-load"]
    workloads = sorted({c.workload for c in fixed})
    backends = sorted({c.backend for c in report.cells})
    width = 0.8 / max(1, len(backends))
    for k, backend in enumerate(backends):
        values = [next((c.tokens_per_s for c in fixed if c.backend == backend and c.workload == w), 0.0)
                  for w in workloads]
        bars.bar([i + k * width for i in range(len(workloads))], values, width, label=backend)
    bars.set_xticks([i + width * (len(backends) - 1) / 2 for i in range(len(workloads))], workloads)
    bars.set_ylabel("output tokens/s (median)")
    bars.set_title(f"{report.model}, {report.engine.threads} threads, {report.rounds} round(s)")
    bars.legend(fontsize=8)
    for backend in backends:
        spread = sorted((c for c in report.cells if c.backend == backend and c.rate is not None),
                        key=lambda c: c.rate or 0)
        if spread:
            rates = [c.rate for c in spread]
            rate_tps.plot(rates, [c.tokens_per_s for c in spread], marker="o", label=backend)
            rate_ttft.plot(rates, [c.ttft_p90_s for c in spread], marker="o", label=backend)
    rate_tps.set_xlabel("arrival rate (requests/s)")
    rate_tps.set_ylabel("output tokens/s")
    rate_tps.set_title("spread: throughput")
    rate_ttft.set_xlabel("arrival rate (requests/s)")
    rate_ttft.set_ylabel("TTFT p90 (s)")
    rate_ttft.axhline(2.0, linestyle=":", color="grey")
    rate_ttft.set_title("spread: TTFT p90 (dotted: 2 s)")
    for ax in (rate_tps, rate_ttft):
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
