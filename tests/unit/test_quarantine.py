"""The worker's quarantine of suspects (requests that were in an engine failure), without a broker, Redis
or model: a suspect waits for an empty engine, runs alone, and nothing else starts meanwhile — and a
suspect found busy never locks the worker (the deadlock an adversarial review found)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from inferlog.messages import TokenizedRecord
from inferlog_worker.admission import Capacity, KvAdmission
from inferlog_worker.dispatch import GpuWorker, _Work


def _record(request_id: str) -> TokenizedRecord:
    return TokenizedRecord.model_validate({"request_id": request_id, "model": "m", "input_ids": [1, 2, 3],
                                           "params": {"max_tokens": 4}})


def _worker() -> tuple[GpuWorker, KvAdmission[_Work], list[str]]:
    admission: KvAdmission[_Work] = KvAdmission(Capacity(10_000, 8))
    runner: Any = SimpleNamespace(failure=None)
    worker = GpuWorker(worker_id="w", runner=runner, consumer=None, publisher=None, topics=None,  # type: ignore[arg-type]
                       admission=admission, max_engine_failures=2)
    started: list[str] = []

    def spawn(coro, group=None):  # type: ignore[no-untyped-def]
        coro.close()
        started.append("spawned")

    worker._spawn = spawn  # type: ignore[method-assign]
    return worker, admission, started


def _track(worker: GpuWorker, admission: KvAdmission[_Work], request_id: str, *, suspect: bool = False,
           state: str = "waiting") -> _Work:
    work = _Work(_record(request_id), [(("t", 0), len(worker._work))], suspect=suspect)
    work.state = state  # type: ignore[assignment]
    worker._work[request_id] = work
    if state == "waiting":
        admission.offer(request_id, 7, work.record.priority, work)
    else:
        admission._reserved[request_id] = 7
    return work


def test_a_suspect_waits_for_an_empty_engine_then_runs_alone() -> None:
    worker, admission, started = _worker()
    busy = _track(worker, admission, "busy", state="running")
    suspect = _track(worker, admission, "suspect", suspect=True)
    other = _track(worker, admission, "other")
    worker._start_admitted()
    assert started == [] and suspect.state == other.state == "waiting", "admitted while the engine was busy"

    worker._drop(busy)
    admission.release("busy")
    worker._start_admitted()
    assert suspect.state == "admitted" and other.state == "waiting"
    assert worker._may_enter_engine(suspect) and worker._quarantine == "suspect"
    assert not worker._may_enter_engine(other)

    suspect.state = "running"
    worker._start_admitted()
    assert other.state == "waiting", "other work started beside a suspect"
    worker._drop(suspect)
    admission.release("suspect")
    worker._start_admitted()
    assert other.state == "admitted" and worker._quarantine is None


def test_a_suspect_found_busy_at_preflight_never_locks_the_worker() -> None:
    worker, admission, started = _worker()
    busy = _track(worker, admission, "busy", state="running")
    suspect = _track(worker, admission, "suspect", suspect=True, state="admitted")  # admitted with others
    assert not worker._may_enter_engine(suspect)  # claims the engine, must wait
    admission.release("suspect")
    suspect.state = "waiting"
    admission.offer("suspect", 7, suspect.record.priority, suspect)  # deferred: offered again
    worker._drop(busy)
    admission.release("busy")
    worker._start_admitted()
    assert suspect.state == "admitted", "the quarantine holder was never admitted again"
    assert worker._may_enter_engine(suspect)


def test_one_strike_short_of_k_is_a_suspect() -> None:
    worker, _admission, _started = _worker()
    assert not worker._is_suspect(0)
    assert worker._is_suspect(1)  # K = 2
    three = GpuWorker(worker_id="w", runner=SimpleNamespace(failure=None), consumer=None, publisher=None,  # type: ignore[arg-type]
                      topics=None, admission=KvAdmission(Capacity(1, 1)), max_engine_failures=3)  # type: ignore[arg-type]
    assert not three._is_suspect(1) and three._is_suspect(2)
