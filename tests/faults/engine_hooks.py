"""Engine faults on purpose, for the fault suite only: a worker started with
``INFERLOG_WORKER_TEST_HOOKS=tests.faults.engine_hooks`` calls ``install(manager)`` before its engine
starts. What to break comes from the environment:

- ``INFERLOG_TEST_ENGINE_FAULT``: ``fail`` (the generation step raises: transformers' thread dies and
  fails its batch) or ``hang`` (the step never returns);
- ``INFERLOG_TEST_ENGINE_FAULT_AFTER_STEPS``: how many steps run normally first, counted once at least
  ``INFERLOG_TEST_ENGINE_FAULT_MIN_ACTIVE`` requests are in the batch (default 1);
- ``INFERLOG_TEST_ENGINE_FAULT_ONCE``: a file; the fault fires only if it does not exist, and creates it
  (so the restarted worker runs normally);
- ``INFERLOG_TEST_ENGINE_POISON``: a request ID; the step raises whenever that request is in the batch;
- ``INFERLOG_TEST_ENGINE_STEP_DELAY_S``: seconds each step waits first (a slow engine, as a real model on
  real hardware is next to the tiny one: its generations outlive a rebalance).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any


def install(manager: Any) -> None:
    fault = os.environ.get("INFERLOG_TEST_ENGINE_FAULT", "")
    after = int(os.environ.get("INFERLOG_TEST_ENGINE_FAULT_AFTER_STEPS", "0"))
    min_active = int(os.environ.get("INFERLOG_TEST_ENGINE_FAULT_MIN_ACTIVE", "1"))
    once = os.environ.get("INFERLOG_TEST_ENGINE_FAULT_ONCE")
    poison = os.environ.get("INFERLOG_TEST_ENGINE_POISON")
    delay = float(os.environ.get("INFERLOG_TEST_ENGINE_STEP_DELAY_S", "0"))
    step = manager._generation_step
    counted = 0

    def active() -> set[str]:
        """The requests in the batch, less the worker's warm-up batch (the faults hit real work only)."""
        processor = manager.batch_processor
        running = set(processor.scheduler.active_requests) if processor is not None else set()
        return {request_id for request_id in running if not request_id.startswith("warmup-")}

    def broken_step() -> None:
        nonlocal counted
        running = active()
        if poison and poison in running:
            raise RuntimeError(f"injected engine failure: poison request {poison} in the batch")
        if fault and len(running) >= min_active and not (once and Path(once).exists()):
            counted += 1
            if counted > after:
                if once:
                    Path(once).write_text(repr(time.time()))  # when it fired, for the test's timing
                if fault == "hang":
                    threading.Event().wait()  # never returns: the engine hangs mid-step
                raise RuntimeError("injected engine failure")
        if delay:
            time.sleep(delay)
        step()

    manager._generation_step = broken_step

