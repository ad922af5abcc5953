"""``inferlog bench``: one invocation runs every backend side by side and writes JSON and a PNG.

Backends: naive (``generate`` one request at a time), static batching, direct continuous batching
(transformers' manager in process, greedy), the engine adapter (the worker's ``ModelRunner`` in process),
the peer server (``transformers serve --continuous-batching``) and the inferlog pipeline (``inferlog up``).
All on the same weights, dtype, threads and engine settings (the worker's: ``max_running``, ``num_blocks``,
``page_size``, ``max_batch_tokens``). Rounds alternate the backends (their order rotates); figures are
medians over rounds. ``--smoke`` runs the tiny model, EOS ignored, in under two minutes (``make test``).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from inferlog.config import DEFAULT_MODEL_NAME, InferlogSettings
from inferlog.messages import ChatMessage
from inferlog.models import ModelRegistry, prepare
from inferlog.prompting import PromptFormatter
from inferlog.testing import build_tiny_llama
from inferlog_bench import engines, servers
from inferlog_bench.results import BenchReport, Cell, EngineSettings, Run
from inferlog_bench.workloads import Workload, saturation, single, spread
from inferlog_worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
IN_PROCESS = ("naive", "static", "direct", "adapter")
HTTP = ("peer-server", "pipeline")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="inferlog bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="the tiny model, small workloads, one round (make test)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--model", choices=["smollm2", "tiny"], default=None, help="default: smollm2 (tiny with --smoke)")
    p.add_argument("--backends", default=",".join(IN_PROCESS + HTTP))
    p.add_argument("--workloads", default="saturation,long,sampled,low-load,spread")
    p.add_argument("--long-repeats", type=int, default=6, help="the long saturation run: the 24 prompts x N")
    p.add_argument("--rates", default="0.25,0.5,1,2", help="spread arrival rates (requests/s)")
    p.add_argument("--spread-requests", type=int, default=120)
    p.add_argument("--static-batch", type=int, default=8)
    p.add_argument("--low-load-requests", type=int, default=5)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    smoke = args.smoke
    model_kind = args.model or ("tiny" if smoke else "smollm2")
    rounds = 1 if smoke else args.rounds
    backends = [b for b in args.backends.split(",") if b]
    unknown = set(backends) - set(IN_PROCESS + HTTP)
    if unknown:
        raise SystemExit(f"unknown backends: {sorted(unknown)}")
    wanted = set(args.workloads.split(","))
    worker = WorkerSettings()
    engine = EngineSettings(max_running=worker.max_running, num_blocks=worker.num_blocks, page_size=worker.page_size,
                            max_batch_tokens=worker.max_batch_tokens,
                            threads=worker.threads or len(os.sched_getaffinity(0)))

    smol = prepare(ModelRegistry(InferlogSettings()).get(DEFAULT_MODEL_NAME)).directory
    if model_kind == "tiny":
        model_dir = build_tiny_llama(Path(tempfile.mkdtemp()) / "tiny", smol)
        name, spec = "tiny", {"name": "tiny", "path": str(model_dir)}
    else:
        model_dir, name, spec = smol, DEFAULT_MODEL_NAME, {"name": DEFAULT_MODEL_NAME}
    formatter = PromptFormatter(model_dir)

    def tokenized(work: Workload) -> Workload:
        return work.with_prompts(formatter.encode_chats([[ChatMessage(**m) for m in chat] for chat in work.chats]))

    n, length = (4, 8) if smoke else (24, 64)
    plan: list[tuple[Workload, tuple[str, ...]]] = []
    if "saturation" in wanted:
        plan.append((saturation(n, length, ignore_eos=smoke), IN_PROCESS + HTTP))
    if "long" in wanted and not smoke:
        plan.append((saturation(n * args.long_repeats, length, name="saturation-long"),
                     ("direct", "adapter", "peer-server", "pipeline")))
    if "sampled" in wanted:
        plan.append((saturation(n, length, ignore_eos=True, temperature=1.0, name="saturation-sampled"),
                     ("direct", "adapter", "pipeline")))
    if "low-load" in wanted:
        plan += [(single(i, length), ("direct", "adapter", "pipeline"))
                 for i in range(2 if smoke else args.low_load_requests)]
    rates = [4.0] if smoke else [float(r) for r in args.rates.split(",")]
    if "spread" in wanted:
        for rate in rates:
            work = spread(6, rate, median=8, cap=16) if smoke else spread(args.spread_requests, rate)
            plan.append((work, ("naive", "static", "direct", "pipeline")))
    plan = [(tokenized(w), tuple(b for b in bs if b in backends)) for w, bs in plan]

    tag = f"bench{uuid.uuid4().hex[:8]}"
    runs: dict[tuple[str, str], list[Run]] = {}
    direct_tokens: dict[str, list[list[int] | None]] = {}
    for round_no in range(rounds):
        order = _rotate([b for b in IN_PROCESS + HTTP if b in backends], round_no)
        for backend in order:
            todo = [w for w, bs in plan if backend in bs]
            if not todo:
                continue
            for run in _run_backend(backend, todo, model_dir, name, spec, engine, args.static_batch, tag):
                runs.setdefault((backend, run.workload), []).append(run)
                if backend == "direct" and round_no == 0:
                    direct_tokens[run.workload] = [r.token_ids for r in run.requests]
                s = run.summary()
                print(f"round {round_no} {backend:12} {run.workload:20} {s.tokens:6d} tok "
                      f"{s.tokens_per_s:8.1f} tok/s  ttft p50 {s.ttft_p50_s * 1000:7.0f} ms", flush=True)

    report = _report(args, smoke, rounds, model_kind, model_dir, engine, plan, runs, direct_tokens, formatter, rates)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(report.model_dump_json(indent=2) + "\n")
    from inferlog_bench.plot import plot

    plot(report, args.out / "bench.png")
    print(json.dumps({"ratios": report.ratios, "max_rate_ttft_p90_2s": report.max_rate_ttft_p90_2s}, indent=2))
    print(f"wrote {args.out / 'bench.json'} and {args.out / 'bench.png'}")
    asyncio.run(_drop_schema(tag))
    return 0


def _rotate(items: list[str], k: int) -> list[str]:
    k %= max(1, len(items))
    return items[k:] + items[:k]


def _run_backend(backend: str, todo: list[Workload], model_dir: Path, name: str, spec: dict[str, str],
                 engine: EngineSettings, static_batch: int, tag: str) -> list[Run]:
    """Every workload of one backend, in processes of its own; low-load singles merge into one run.
    In-process backends run while no server is up; each server is started for its workloads and stopped
    after them."""
    if backend in IN_PROCESS:
        return _merge_singles(engines.run_in_process(backend, model_dir, todo, engine, static_batch))
    if backend == "peer-server":
        with servers.peer_server(model_dir, engine) as url:
            return _merge_singles([asyncio.run(servers.peer_run(url, model_dir, w, engine.max_running))
                                   for w in todo])
    with servers.pipeline(name, spec, engine, tag) as url:
        return _merge_singles([asyncio.run(servers.pipeline_run(url, w, engine.max_running)) for w in todo])


def _merge_singles(runs: list[Run]) -> list[Run]:
    """The low-load singles are one run of requests one at a time (elapsed: their sum)."""
    singles = [r for r in runs if r.workload == "low-load"]
    rest = [r for r in runs if r.workload != "low-load"]
    if singles:
        rest.append(Run(singles[0].backend, "low-load", sum(r.elapsed_s for r in singles),
                        [q for r in singles for q in r.requests]))
    return rest


def _report(args: argparse.Namespace, smoke: bool, rounds: int, model_kind: str, model_dir: Path,
            engine: EngineSettings, plan: list[tuple[Workload, tuple[str, ...]]],
            runs: dict[tuple[str, str], list[Run]], direct_tokens: dict[str, list[list[int] | None]],
            formatter: PromptFormatter, rates: list[float]) -> BenchReport:
    rate_of = {w.name: w.rate for w, _ in plan}
    cells = []
    for (backend, workload), rs in sorted(runs.items()):
        cell = Cell.of(backend, workload, rate_of.get(workload), [r.summary() for r in rs])
        reference = direct_tokens.get(workload)
        if reference is not None and workload != "low-load" and not workload.endswith("sampled"):
            first = rs[0].requests
            cell.identical_to_direct = sum(
                (q.token_ids == ref) if q.token_ids is not None else (q.text == formatter.decode(ref or []))
                for q, ref in zip(first, reference, strict=True))
        cells.append(cell)

    def per_round(a: str, b: str, workload: str, key: str = "tokens_per_s") -> float | None:
        ra, rb = runs.get((a, workload)), runs.get((b, workload))
        if not ra or not rb:
            return None
        return statistics.median(getattr(x.summary(), key) / getattr(y.summary(), key) for x, y in zip(ra, rb, strict=False))

    ratios: dict[str, float] = {}
    top = f"spread@{max(rates):g}"
    for label, value in [
        ("saturation_long.pipeline_over_direct", per_round("pipeline", "direct", "saturation-long")),
        ("saturation_long.pipeline_over_peer_server", per_round("pipeline", "peer-server", "saturation-long")),
        ("saturation.pipeline_over_direct", per_round("pipeline", "direct", "saturation")),
        ("saturation.pipeline_over_peer_server", per_round("pipeline", "peer-server", "saturation")),
        ("saturation.adapter_over_direct", per_round("adapter", "direct", "saturation")),
        ("saturation.peer_server_over_direct", per_round("peer-server", "direct", "saturation")),
        ("sampled.pipeline_over_direct", per_round("pipeline", "direct", "saturation-sampled")),
        ("sampled.adapter_over_direct", per_round("adapter", "direct", "saturation-sampled")),
        ("spread_top.direct_over_naive", per_round("direct", "naive", top)),
        ("spread_top.direct_over_static", per_round("direct", "static", top)),
        ("spread_top.pipeline_over_naive", per_round("pipeline", "naive", top)),
        ("spread_top.pipeline_over_static", per_round("pipeline", "static", top)),
    ]:
        if value is not None:
            ratios[label] = value
    low = {b: runs.get((b, "low-load")) for b in ("pipeline", "direct", "adapter")}
    if low["pipeline"] and low["direct"]:
        ratios["low_load.pipeline_minus_direct_ttft_p50_ms"] = statistics.median(
            (p.summary().ttft_p50_s - d.summary().ttft_p50_s) * 1000 for p, d in zip(low["pipeline"], low["direct"], strict=False))

    max_rate: dict[str, float | None] = {}
    for cell in cells:
        if cell.rate is not None:
            ok = cell.ttft_p90_s <= 2.0
            best = max_rate.get(cell.backend)
            max_rate[cell.backend] = max(best or 0.0, cell.rate) if ok else best
            max_rate.setdefault(cell.backend, None)
    notes = []
    if rounds < 5:
        notes.append(f"{rounds} round(s), not the 5 the targets are quoted over")
    versions = {p: importlib.metadata.version(p) for p in ("torch", "transformers", "tokenizers", "aiokafka")}
    versions["python"] = sys.version.split()[0]
    return BenchReport(
        git_sha=_git_sha(), started_at=time.time(), model=model_kind, model_dir=str(model_dir), smoke=smoke,
        rounds=rounds, versions=versions, cores=len(os.sched_getaffinity(0)), engine=engine,
        workloads=_describe(plan),
        cells=cells, ratios=ratios, max_rate_ttft_p90_2s=max_rate, notes=notes)


def _describe(plan: list[tuple[Workload, tuple[str, ...]]]) -> dict[str, dict[str, object]]:
    """Each workload as run (the low-load singles as one: their requests one at a time)."""
    described: dict[str, dict[str, object]] = {}
    for w, bs in plan:
        d = described.setdefault(w.name, {"requests": 0, "max_tokens_total": 0, "ignore_eos": w.ignore_eos,
                                          "temperature": w.temperature, "rate": w.rate, "backends": list(bs)})
        d["requests"] = int(d["requests"]) + len(w)  # type: ignore[call-overload]
        d["max_tokens_total"] = int(d["max_tokens_total"]) + sum(w.max_tokens)  # type: ignore[call-overload]
    return described


def _git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


async def _drop_schema(schema: str) -> None:
    import asyncpg

    try:
        conn = await asyncpg.connect(InferlogSettings().postgres_url)
    except (OSError, asyncpg.PostgresError):
        return  # the embedded Postgres: it went with the stack
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


if __name__ == "__main__":
    sys.exit(main())
