"""Running ``inferlog up`` itself, as a user would, with this run's own broker port, topics and schema."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from inferlog import broker
from inferlog.config import InferlogSettings
from tests.conftest import free_port, settings_env
from tests.faults.conftest import make_cluster  # noqa: F401 - the pipeline as processes, for the e2e tests too


@dataclass
class RunningStack:
    url: str
    settings: InferlogSettings
    proc: subprocess.Popen[str]
    pids: dict[str, int] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)


@contextmanager
def inferlog_up(settings: InferlogSettings, *, timeout: float = 300, extra_env: dict[str, str] | None = None
                ) -> Iterator[RunningStack]:
    """Start ``inferlog up``; yield once it printed its URL; SIGTERM it and check it stopped cleanly."""
    port = free_port()
    env = dict(os.environ, **settings_env(settings), INFERLOG_GATEWAY_PORT=str(port), PYTHONUNBUFFERED="1",
               **(extra_env or {}))
    proc = subprocess.Popen([sys.executable, "-m", "inferlog.cli", "up"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    stack = RunningStack(url=f"http://127.0.0.1:{port}", settings=settings, proc=proc)
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            stack.lines.append(line)
            match = re.match(r"^(broker|gateway|tokenizer|gpu-worker|result-store) pid=(\d+)", line)
            if match:
                stack.pids[match.group(1)] = int(match.group(2))
            if line.startswith("inferlog is up"):
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not ready.wait(0.2):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("inferlog up did not come up:\n" + "".join(stack.lines[-60:]))
    try:
        yield stack
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        host, broker_port = broker.parse_bootstrap(settings.kafka_bootstrap)
        _wait_port_free(host, broker_port)
        tail = "".join(stack.lines[-60:])
        assert code == 0, f"inferlog up exited with {code}:\n{tail}"
        for name, pid in stack.pids.items():
            assert not _alive(pid), f"{name} (pid {pid}) outlived inferlog up"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie is dead for our purposes
        return stat.read().split()[2] != "Z"


def _wait_port_free(host: str, port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while broker.port_answers(host, port) and time.monotonic() < deadline:
        time.sleep(0.1)


async def response_ended(client: Any, response_id: str, timeout: float = 60) -> Any:
    """``client.responses.retrieve`` until the response leaves queued and in_progress (or the time runs out:
    the last one read)."""
    deadline = time.monotonic() + timeout
    while True:
        response = await client.responses.retrieve(response_id)
        if response.status not in ("queued", "in_progress") or time.monotonic() > deadline:
            return response
        await asyncio.sleep(0.1)
