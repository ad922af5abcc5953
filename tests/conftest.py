"""Shared fixtures: a real broker (Tansu on a free port), the machine's Postgres and Redis with a fresh
schema / topic prefix / key prefix per run, the real SmolLM2 (prepared once, cached) and a tiny random
Llama that borrows its tokenizer."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from inferlog import broker
from inferlog.config import DEFAULT_MODEL_NAME, InferlogSettings, ModelSpec
from inferlog.db import migrate
from inferlog.epoch import prepare_broker
from inferlog.models import ModelRegistry, prepare
from inferlog.testing import build_tiny_llama
from inferlog.topics import Topics

POSTGRES_URL = os.environ.get("INFERLOG_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("INFERLOG_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
TINY = "tiny-llama"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def run_id() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture(scope="session")
def bootstrap() -> Iterator[str]:
    """A Tansu broker of the test run's own, on a free port; ended by PID at the end."""
    port = free_port()
    proc = broker.start_tansu("127.0.0.1", port)
    yield f"127.0.0.1:{port}"
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    """The real SmolLM2, converted from the bundled GGUF once and cached in ~/.cache/inferlog."""
    model = ModelRegistry(InferlogSettings()).get(DEFAULT_MODEL_NAME)
    return prepare(model).directory


@pytest.fixture(scope="session")
def tiny_dir(smol_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("models") / TINY, smol_dir, context=512)


def make_settings(run_id: str, bootstrap: str, tiny_dir: Path, *, suffix: str = "", default: str = TINY,
                  with_smollm2: bool = True, **extra: object) -> InferlogSettings:
    name = f"t{run_id}{suffix}"
    models = [ModelSpec(name=TINY, path=str(tiny_dir))]
    if with_smollm2:
        models.append(ModelSpec(name=DEFAULT_MODEL_NAME))
    options: dict[str, object] = dict(
        kafka_bootstrap=bootstrap, topic_prefix=name, postgres_url=POSTGRES_URL, postgres_schema=name,
        redis_url=REDIS_URL, redis_prefix=name, models=models, default_model=default)
    options.update(extra)
    return InferlogSettings(**options)  # type: ignore[arg-type]


def settings_env(settings: InferlogSettings) -> dict[str, str]:
    """The environment that gives a child process these settings."""
    return {
        "INFERLOG_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "INFERLOG_TOPIC_PREFIX": settings.topic_prefix,
        "INFERLOG_TOPIC_PARTITIONS": str(settings.topic_partitions),
        "INFERLOG_POSTGRES_URL": settings.postgres_url,
        "INFERLOG_POSTGRES_SCHEMA": settings.postgres_schema,
        "INFERLOG_REDIS_URL": settings.redis_url,
        "INFERLOG_REDIS_PREFIX": settings.redis_prefix,
        "INFERLOG_MODELS": "[" + ",".join(m.model_dump_json(exclude_none=True) for m in settings.models) + "]",
        "INFERLOG_DEFAULT_MODEL": settings.default_model,
        "INFERLOG_CACHE_DIR": str(settings.cache_dir),
    }


@pytest.fixture(scope="session")
async def settings(run_id: str, bootstrap: str, tiny_dir: Path) -> AsyncIterator[InferlogSettings]:
    """Settings for this run: its own topics (created) and its own database schema (migrated, then dropped)."""
    s = make_settings(run_id, bootstrap, tiny_dir)
    await migrate(s.postgres_url, s.postgres_schema)
    await prepare_broker(s.kafka_bootstrap, Topics.from_settings(s))
    yield s
    await drop_schema(s.postgres_schema)


async def connect_to_schema(settings: InferlogSettings) -> asyncpg.Connection:
    """A Postgres connection that sees the run's own schema first."""
    return await asyncpg.connect(settings.postgres_url, server_settings={"search_path": settings.postgres_schema})


async def drop_schema(schema: str) -> None:
    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


async def eventually(check, timeout: float = 30.0, interval: float = 0.1):  # type: ignore[no-untyped-def]
    """Await ``check()`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await check()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last value {value!r})")
        await asyncio.sleep(interval)
