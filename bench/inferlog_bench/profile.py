"""Where the pipeline's CPU goes: ``inferlog up``, a saturation workload over HTTP, and py-spy sampling every
process of the stack (``--subprocesses``) while it runs. Prints the top frames per process (self time, and
the worker's inclusive time) from py-spy's raw (collapsed) stacks.

    .venv/bin/python -m inferlog_bench.profile [--requests 48] [--seconds 40] [--out DIR]

Run it on an idle machine (it is a measurement). ``PYTHONPATH`` pointing at another checkout's
``shared`` and ``services/*`` directories profiles that checkout's code with this one's bench (the
"before" of a change).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import subprocess
import sys
import tempfile
import threading
import uuid
from pathlib import Path

import psutil

from inferlog.config import DEFAULT_MODEL_NAME
from inferlog_bench import servers
from inferlog_bench.results import EngineSettings
from inferlog_bench.workloads import saturation
from inferlog_worker.settings import WorkerSettings


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--seconds", type=int, default=40)
    p.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp()))
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args(argv)
    worker = WorkerSettings()
    import os

    engine = EngineSettings(max_running=worker.max_running, num_blocks=worker.num_blocks, page_size=worker.page_size,
                            max_batch_tokens=worker.max_batch_tokens, threads=len(os.sched_getaffinity(0)))
    args.out.mkdir(parents=True, exist_ok=True)
    raw = args.out / "profile.txt"
    work = saturation(args.requests, 64)
    with servers.pipeline(DEFAULT_MODEL_NAME, {"name": DEFAULT_MODEL_NAME}, engine, f"prof{uuid.uuid4().hex[:8]}") as url:
        up = next(q for q in psutil.process_iter(["cmdline"]) if q.info["cmdline"] and
                  q.info["cmdline"][-2:] == ["inferlog.cli", "up"])
        spy = subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "--subprocesses", "-p",
                                str(up.pid), "-d", str(args.seconds), "-f", "raw", "-o", str(raw), "--nonblocking"],
                               stdout=(args.out / "py-spy.log").open("wb"), stderr=subprocess.STDOUT)
        result: dict[str, float] = {}
        thread = threading.Thread(target=lambda: result.update(
            tokens_per_s=asyncio.run(servers.pipeline_run(url, work, engine.max_running)).summary().tokens_per_s))
        thread.start()
        spy.wait()
        thread.join()
    print(f"pipeline: {result.get('tokens_per_s', 0):.1f} tokens/s while profiled; raw stacks in {raw}")
    if spy.returncode != 0 or not raw.exists():
        print(f"py-spy failed (exit {spy.returncode}): {(args.out / 'py-spy.log').read_text()[-2000:]}")
        return 1
    report(raw, args.top)
    return 0


def report(raw: Path, top: int) -> None:
    """Per process: its share of all samples, and its top frames by self time."""
    per_process: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    inclusive: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        process = [f for f in frames if f.startswith("process ")][-1]  # py-spy nests a child under its parents
        per_process[process][frames[-1]] += int(count)
        for frame in {f for f in frames if not f.startswith("process ")}:
            inclusive[process][frame] += int(count)
    total = sum(sum(c.values()) for c in per_process.values())
    for process, counted in sorted(per_process.items(), key=lambda kv: -sum(kv[1].values())):
        samples = sum(counted.values())
        print(f"\n{process[:100]}: {100 * samples / total:.1f}% of samples")
        for frame, n in counted.most_common(top):
            print(f"  self {100 * n / samples:5.1f}%  {frame[:150]}")
        if "gpu-worker" in process:
            for frame, n in inclusive[process].most_common(top):
                print(f"  incl {100 * n / samples:5.1f}%  {frame[:150]}")


if __name__ == "__main__":
    sys.exit(main())
