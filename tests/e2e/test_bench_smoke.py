"""``inferlog bench --smoke`` cannot rot: every backend runs on the tiny model (EOS ignored), returns
N x max_tokens tokens, and the run writes schema-valid JSON and a PNG; and ``bench/gpu_check.sh --tiny``
runs both engines and the shim's pin checks on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from inferlog_bench.results import BenchReport

pytestmark = pytest.mark.e2e

BACKENDS = {"naive", "static", "direct", "adapter", "peer-server", "pipeline"}


@pytest.mark.timeout(400)
def test_bench_smoke_runs_every_backend(tmp_path: Path) -> None:
    env = dict(os.environ, INFERLOG_LOG_LEVEL="WARNING")
    done = subprocess.run([sys.executable, "-m", "inferlog.cli", "bench", "--smoke", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=380)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    report = BenchReport.model_validate_json((tmp_path / "bench.json").read_text())
    png = (tmp_path / "bench.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert report.smoke and report.model == "tiny"
    cells = {(c.backend, c.workload): c for c in report.cells}
    assert {backend for backend, _ in cells} == BACKENDS
    saturation = {b: c for (b, w), c in cells.items() if w == "saturation"}
    assert set(saturation) == BACKENDS
    planned = report.workloads["saturation"]["max_tokens_total"]
    for backend, cell in saturation.items():
        assert [r.tokens for r in cell.rounds] == [planned], backend  # N x max_tokens, EOS ignored
        assert cell.tokens_per_s > 0 and cell.ttft_p50_s > 0, backend
    for workload, spec in report.workloads.items():
        for backend in spec["backends"]:
            cell = cells[(backend, workload)]
            assert all(r.tokens == spec["max_tokens_total"] for r in cell.rounds), (backend, workload)
    # Greedy and EOS ignored: the backends that take token IDs agree with direct continuous batching.
    assert saturation["adapter"].identical_to_direct == report.workloads["saturation"]["requests"]
    assert "saturation.pipeline_over_direct" in report.ratios
    assert "low_load.pipeline_minus_direct_ttft_p50_ms" in report.ratios


@pytest.mark.timeout(300)
def test_gpu_check_tiny_mode(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(["bash", "bench/gpu_check.sh", "--tiny", "--json", str(out)], capture_output=True,
                          text=True, timeout=280, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["pins"] == "ok" and report["device"] == "cpu"
    assert report["versions"]["transformers"]
    rows = {(r["backend"], r["batch"]): r for r in report["rows"]}
    assert set(rows) == {(b, n) for b in ("direct", "adapter") for n in (1, 4)}
    for (_, batch), row in rows.items():
        assert row["tokens"] == batch * report["new_tokens"] and row["steps"] >= report["new_tokens"]
        assert row["tokens_per_s"] > 0 and row["ms_per_step"] > 0
