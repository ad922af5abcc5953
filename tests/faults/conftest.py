from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import psutil
import pytest

from inferlog.embedded import EmbeddedPostgres, EmbeddedRedis
from tests.conftest import drop_schema, free_port, make_settings
from tests.faults.harness import Cluster

# 32 at a time, short leases. (Greedy requests cost what the greedy engine costs: no sampling switch.)
WORKER = {
    "INFERLOG_WORKER_MAX_RUNNING": "32", "INFERLOG_WORKER_NUM_BLOCKS": "256",
    "INFERLOG_WORKER_MAX_BATCH_TOKENS": "512", "INFERLOG_WORKER_LEASE_TTL_MS": "3000",
    "INFERLOG_WORKER_SESSION_TIMEOUT_MS": "6000", "INFERLOG_WORKER_HEARTBEAT_INTERVAL_MS": "1000",
    "INFERLOG_WORKER_WATCH_INTERVAL_S": "0.5", "INFERLOG_WORKER_LOAD_INTERVAL_S": "0.2",
}
FAULT_BUDGET_S = 90.0

MakeCluster = Callable[..., Awaitable[Cluster]]


@pytest.fixture
async def make_cluster(run_id: str, tiny_dir: Path, tmp_path: Path) -> AsyncIterator[MakeCluster]:
    clusters: list[Cluster] = []

    async def factory(name: str, **overrides: object) -> Cluster:
        settings = make_settings(run_id, f"127.0.0.1:{free_port()}", tiny_dir, suffix=name, with_smollm2=False,
                                 **overrides)
        cluster = Cluster(settings, tmp_path)
        clusters.append(cluster)
        await cluster.start_infra()
        return cluster

    yield factory
    for cluster in clusters:
        await cluster.close()
        await drop_schema(cluster.settings.postgres_schema)


@pytest.fixture
def own_redis() -> Iterator[EmbeddedRedis]:
    """A Redis of the test's own, to stop or pause (never the machine's)."""
    redis = EmbeddedRedis(free_port())
    redis.start()
    yield redis
    if redis.proc is not None:
        redis.proc.send_signal(signal.SIGCONT)
    redis.stop()


@pytest.fixture
def own_postgres(tmp_path: Path) -> Iterator[EmbeddedPostgres]:
    """A Postgres of the test's own, to stop or pause (never the machine's)."""
    postgres = EmbeddedPostgres(tmp_path / "pg", free_port())
    postgres.start()
    yield postgres
    resume_postgres(postgres)
    postgres.stop()


def pause_postgres(postgres: EmbeddedPostgres) -> None:
    """Stop the server and every backend (SIGSTOP): queries in flight and new ones hang, connections stay
    open. Not killpg: each PostgreSQL backend calls setsid(), so the postmaster's process group holds the
    postmaster alone (a paused postmaster with running backends answers every open connection)."""
    assert postgres.proc is not None
    postmaster = psutil.Process(postgres.proc.pid)
    postmaster.suspend()  # first: it forks no new backend meanwhile
    for child in postmaster.children(recursive=True):
        child.suspend()


def resume_postgres(postgres: EmbeddedPostgres) -> None:
    if postgres.proc is None or postgres.proc.poll() is not None:
        return
    postmaster = psutil.Process(postgres.proc.pid)
    for child in postmaster.children(recursive=True):
        child.resume()
    postmaster.resume()


def start_pipeline(cluster: Cluster, workers: tuple[str, ...] = ("w",), **worker_env: str) -> None:
    cluster.spawn("store", "result-store")
    for name in workers:
        cluster.spawn(name, "gpu-worker", **{**WORKER, **worker_env})
    cluster.spawn("tok", "tokenizer")
    cluster.spawn("gw", "gateway")
