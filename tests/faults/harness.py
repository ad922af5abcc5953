"""The fault suite's harness: a cluster of real processes (`inferlog run <service>` each, over its own
Tansu broker), a client that submits the way a user's program would (retrying 503s and connection errors
with the same Idempotency-Key), and the invariant checker.

The checker computes, DESIGN.md's contract in numbers:
- lost: IDs that got a 202 and have no terminal result in the store;
- conflicting outcomes: IDs with two different terminal results on the results topic, or whose stored
  result is not one of those on the topic;
- generations: acknowledged attempt events (``running`` events from the gpu-worker stage).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
from aiokafka import TopicPartition
from pydantic import ValidationError
from redis.asyncio import Redis

from inferlog import broker
from inferlog.config import InferlogSettings
from inferlog.db import migrate
from inferlog.epoch import prepare_broker
from inferlog.hot import Keys
from inferlog.kafka import make_consumer
from inferlog.logscan import read_all
from inferlog.messages import EventRecord, ResultRecord, Status
from inferlog.topics import Topics, group_is_consuming
from tests.conftest import connect_to_schema, free_port, settings_env

TERMINAL = {s.value for s in Status if s.is_terminal()}


@dataclass
class Proc:
    name: str
    service: str
    env: dict[str, str]
    log: Path
    popen: subprocess.Popen[bytes]
    incarnation: int = 1


@dataclass
class Cluster:
    """Processes of one fault test, all ended by PID at the end."""

    settings: InferlogSettings
    workdir: Path
    gateway_port: int = field(default_factory=free_port)
    procs: dict[str, Proc] = field(default_factory=dict)
    broker_proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    @property
    def topics(self) -> Topics:
        return Topics.from_settings(self.settings)

    async def start_infra(self) -> None:
        host, port = broker.parse_bootstrap(self.settings.kafka_bootstrap)
        self.broker_proc = broker.start_tansu(host, port, log_file=self.workdir / "broker.log")
        await migrate(self.settings.postgres_url, self.settings.postgres_schema)
        await prepare_broker(self.settings.kafka_bootstrap, self.topics)

    def restart_broker(self) -> None:
        """Kill the broker and start it again on the same port: empty (Tansu keeps its log in memory)."""
        assert self.broker_proc is not None
        self.broker_proc.kill()
        self.broker_proc.wait(timeout=10)
        host, port = broker.parse_bootstrap(self.settings.kafka_bootstrap)
        self.broker_proc = broker.start_tansu(host, port, log_file=self.workdir / "broker.log")

    def spawn(self, name: str, service: str, **env: str) -> Proc:
        previous = self.procs.get(name)
        incarnation = previous.incarnation + 1 if previous else 1
        full_env = {**os.environ, **settings_env(self.settings), "INFERLOG_LOG_LEVEL": "INFO",
                    "INFERLOG_GATEWAY_PORT": str(self.gateway_port), **env}
        if service == "gpu-worker":
            full_env.setdefault("INFERLOG_WORKER_WORKER_ID", f"{name}.{incarnation}")
        log = self.workdir / f"{name}.log"
        with log.open("ab") as out:
            popen = subprocess.Popen([sys.executable, "-m", "inferlog.cli", "run", service], env=full_env,
                                     stdout=out, stderr=subprocess.STDOUT)
        self.procs[name] = Proc(name, service, env, log, popen, incarnation)
        return self.procs[name]

    def restart(self, name: str) -> Proc:
        proc = self.procs[name]
        return self.spawn(name, proc.service, **proc.env)

    def signal(self, name: str, sig: signal.Signals) -> None:
        self.procs[name].popen.send_signal(sig)
        if sig in (signal.SIGKILL,):
            self.procs[name].popen.wait()

    def worker_id(self, name: str) -> str:
        proc = self.procs[name]
        return proc.env.get("INFERLOG_WORKER_WORKER_ID", f"{name}.{proc.incarnation}")

    async def load(self, name: str) -> dict[str, str]:
        redis = Redis.from_url(self.settings.redis_url, decode_responses=True)
        try:
            return await redis.hgetall(Keys(self.settings.redis_prefix).worker(self.worker_id(name)))  # type: ignore[no-any-return]
        finally:
            await redis.aclose()

    async def wait_ready(self, timeout: float = 120) -> None:
        """Every worker reports load, the consumer groups settled, the gateway is ready."""
        deadline = time.monotonic() + timeout
        for name, proc in self.procs.items():
            while proc.service == "gpu-worker" and not await self.load(name):
                self._check_alive(deadline)
                await asyncio.sleep(0.2)
        for service in ("tokenizer", "result-store"):
            if any(p.service == service for p in self.procs.values()):
                while not await group_is_consuming(self.settings.kafka_bootstrap, self.topics.group(service)):
                    self._check_alive(deadline)
                    await asyncio.sleep(0.2)
        if any(p.service == "gateway" for p in self.procs.values()):
            async with httpx.AsyncClient(base_url=self.url, timeout=2) as http:
                while True:
                    try:
                        if (await http.get("/readyz")).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    self._check_alive(deadline)
                    await asyncio.sleep(0.2)

    def _check_alive(self, deadline: float) -> None:
        for proc in self.procs.values():
            if proc.popen.poll() is not None:
                raise AssertionError(f"{proc.name} exited with {proc.popen.returncode}:\n{tail(proc.log)}")
        if time.monotonic() > deadline:
            raise AssertionError("cluster not ready in time")

    async def close(self) -> None:
        for proc in self.procs.values():
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGCONT)
                proc.popen.terminate()
        for proc in self.procs.values():
            try:
                proc.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()
        if self.broker_proc is not None:
            self.broker_proc.send_signal(signal.SIGCONT)
            self.broker_proc.terminate()
            self.broker_proc.wait(timeout=10)
        redis = Redis.from_url(self.settings.redis_url)
        try:
            keys = [k async for k in redis.scan_iter(f"{self.settings.redis_prefix}:*")]
            if keys:
                await redis.delete(*keys)
        except Exception:  # noqa: BLE001 - best-effort cleanup of a store the test may have stopped
            pass
        finally:
            await redis.aclose()


async def running_at_least(cluster: Cluster, name: str, n: int) -> dict[str, str] | None:
    """The worker's load hash once its running batch has at least ``n`` requests (else None)."""
    load = await cluster.load(name)
    return load if load and int(load.get("running", 0)) >= n else None


async def truthy(value: object) -> bool:
    """For ``eventually(lambda: truthy(...))`` on a plain condition."""
    return bool(value)


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


@dataclass
class Client:
    """Submits like a user's program: every request has its own Idempotency-Key and is retried on 5xx,
    429 and connection errors until it gets a 202 (or the deadline passes)."""

    url: str
    accepted: dict[str, dict[str, Any]] = field(default_factory=dict)
    retries: int = 0
    concurrency: int = 16
    replayed_after_failure: set[str] = field(default_factory=set)
    """Keys whose first tries failed and whose 202 then said ``Idempotent-Replayed``: the job was claimed by
    a try whose answer never arrived (the claim outlived the failure)."""

    async def submit_many(self, bodies: dict[str, dict[str, Any]], deadline_s: float = 60) -> None:
        gate = asyncio.Semaphore(self.concurrency)
        deadline = time.monotonic() + deadline_s
        async with httpx.AsyncClient(base_url=self.url, timeout=10) as http:
            async def one(key: str, body: dict[str, Any]) -> None:
                async with gate:
                    failed = False
                    while time.monotonic() < deadline:
                        try:
                            response = await http.post("/v1/requests", json=body, headers={"Idempotency-Key": key})
                            if response.status_code == 202:
                                self.accepted[response.json()["id"]] = body
                                if failed and response.headers.get("Idempotent-Replayed") == "true":
                                    self.replayed_after_failure.add(key)
                                return
                            assert response.status_code in (429, 503), response.text
                        except httpx.HTTPError:
                            pass
                        failed = True
                        self.retries += 1
                        await asyncio.sleep(0.2 + random.random() * 0.3)

            await asyncio.gather(*(one(key, body) for key, body in bodies.items()))


def long_bodies(count: int, prefix: str, *, low: int = 128, high: int = 256, seed: int = 0) -> dict[str, dict[str, Any]]:
    """``count`` requests with 128–256 output tokens (EOS ignored), keyed by their Idempotency-Key."""
    rng = random.Random(seed)
    return {f"{prefix}-{i}": {"messages": [{"role": "user", "content": f"Request {i}: tell a long story."}],
                              "max_tokens": rng.randint(low, high), "ignore_eos": True}
            for i in range(count)}


@dataclass
class Report:
    accepted: int
    lost: list[str]
    conflicting: list[str]
    generations: int
    generations_by_id: dict[str, int]
    statuses: dict[str, int]
    attempted_by: dict[str, set[str]]
    """worker_id → request IDs it recorded an attempt for."""
    finished_by: dict[str, set[str]]
    """worker_id → request IDs it published a result for."""
    attempt_times: dict[str, list[float]] = field(default_factory=dict)
    """request_id → when each of its attempts was admitted (epoch seconds), in order."""

    def interrupted(self, worker_id: str) -> set[str]:
        """Requests the worker started and never finished: its in-flight work when it died."""
        return self.attempted_by.get(worker_id, set()) - self.finished_by.get(worker_id, set())

    @property
    def regenerated(self) -> list[str]:
        return [rid for rid, n in self.generations_by_id.items() if n > 1]

    def early_retries(self, not_before: float) -> dict[str, list[float]]:
        """Requests with an attempt after their first that started before ``not_before``: a takeover that
        came before the first holder's lease could have expired (a second live generation)."""
        return {rid: times for rid, times in self.attempt_times.items()
                if any(t < not_before for t in sorted(times)[1:])}

    def taken_over_early(self, expiries: dict[str, float]) -> dict[str, tuple[float, list[float]]]:
        """Requests attempted again before the lease their dead holder left had expired (``lease_expiries``,
        read at the kill): request_id → (expiry, attempt times). Exact, where a fixed "TTL less one renewal
        interval" from the kill is not: a renewal that ran late moves the expiry earlier than that."""
        return {rid: (expiry, self.attempt_times[rid]) for rid, expiry in expiries.items()
                if any(t < expiry for t in self.attempt_times.get(rid, [])[1:])}


async def lease_expiries(settings: InferlogSettings, holder: str) -> dict[str, float]:
    """The live leases whose value names ``holder`` (a worker ID), request_id → when each expires (epoch
    seconds, from Redis's PTTL). Read just after the holder was killed, when nothing renews them: no other
    worker may start their requests before then."""
    redis = Redis.from_url(settings.redis_url, decode_responses=True)
    prefix = Keys(settings.redis_prefix).lease("")
    expiries: dict[str, float] = {}
    try:
        async for key in redis.scan_iter(f"{prefix}*", count=1000):
            asked_at = time.time()  # before the read: the expiry errs early by one round trip, never late
            async with redis.pipeline(transaction=True) as pipe:
                pipe.get(key)
                pipe.pttl(key)
                value, pttl = await pipe.execute()
            if value and value.startswith(f"{holder}/") and pttl > 0:
                expiries[key[len(prefix):]] = asked_at + pttl / 1000
    finally:
        await redis.aclose()
    return expiries


async def read_topic(settings: InferlogSettings, topic: str, timeout: float = 30) -> list[tuple[bytes | None, bytes]]:
    """Every record of ``topic``, each partition read to its high-water mark (``inferlog.logscan``: fails
    rather than returning a short read)."""
    return [(r.key, r.value or b"") for r in await read_all(settings.kafka_bootstrap, topic, timeout_s=timeout)]


_R = TypeVar("_R", ResultRecord, EventRecord)


async def results_on_log(settings: InferlogSettings) -> list[ResultRecord]:
    """Every result on the results topic, read to its high-water mark (poison records left out: the store
    dead-letters them, so do we)."""
    return _parsed(ResultRecord, await read_topic(settings, Topics.from_settings(settings).results))


async def attempts_on_log(settings: InferlogSettings) -> list[EventRecord]:
    """Every acknowledged attempt (a worker's ``running`` event), in the order they were admitted, the events
    topic read to its high-water mark."""
    events = _parsed(EventRecord, await read_topic(settings, Topics.from_settings(settings).events))
    return [e for e in events if e.stage == "gpu-worker" and e.status is Status.RUNNING]


def _parsed(model: type[_R], values: list[tuple[bytes | None, bytes]]) -> list[_R]:
    parsed = []
    for _key, value in values:
        try:
            parsed.append(model.model_validate_json(value))
        except ValidationError:
            continue
    return parsed


async def completed_since(settings: InferlogSettings, since: float) -> list[str]:
    """The requests whose result on the log was completed after ``since`` (epoch seconds): work a fault hit
    while it was in flight."""
    return [r.request_id for r in await results_on_log(settings) if (r.timings.completed_at or 0.0) > since]


async def attempts_so_far(settings: InferlogSettings) -> tuple[list[str], set[str]]:
    """The requests with an acknowledged attempt, in the order they were admitted, and those with a result
    on the log."""
    attempted = dict.fromkeys(e.request_id for e in await attempts_on_log(settings))
    return list(attempted), {r.request_id for r in await results_on_log(settings)}


async def ledger_rows(settings: InferlogSettings, ids: list[str]) -> dict[str, dict[str, Any]]:
    """The ledger's row (status, replays) of each of ``ids`` that was claimed."""
    conn = await connect_to_schema(settings)
    try:
        return {r["request_id"]: dict(r) for r in await conn.fetch(
            "SELECT request_id, status, replays FROM requests WHERE request_id = ANY($1::text[])", ids)}
    finally:
        await conn.close()


async def stage_times(settings: InferlogSettings, ids: list[str]) -> dict[str, dict[str, float]]:
    """Each job's timings (``received_at`` … ``completed_at``) plus ``stored_at``, when the store recorded
    its result: what shows a fault hit work in flight (a result that waited in the log for the store)."""
    conn = await connect_to_schema(settings)
    try:
        rows = await conn.fetch("SELECT q.request_id, q.timings || COALESCE(r.timings, '{}') AS t, r.created_at "
                                "FROM requests q LEFT JOIN results r USING (request_id) "
                                "WHERE q.request_id = ANY($1::text[])", ids)
    finally:
        await conn.close()
    return {r["request_id"]: {**json.loads(r["t"]),
                              **({"stored_at": r["created_at"].timestamp()} if r["created_at"] else {})}
            for r in rows}


async def wait_all_terminal(settings: InferlogSettings, ids: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    conn = await connect_to_schema(settings)
    try:
        while True:
            done = await conn.fetchval("SELECT count(*) FROM results WHERE request_id = ANY($1::text[])", ids)
            if done == len(ids) or time.monotonic() > deadline:
                return
            await asyncio.sleep(0.5)
    finally:
        await conn.close()


async def check(settings: InferlogSettings, accepted: list[str]) -> Report:
    conn = await connect_to_schema(settings)
    try:
        stored = {r["request_id"]: (r["status"], r["text"]) for r in await conn.fetch(
            "SELECT request_id, status, text FROM results WHERE request_id = ANY($1::text[])", accepted)}
    finally:
        await conn.close()
    on_topic: dict[str, set[tuple[str, str | None]]] = defaultdict(set)
    finished_by: dict[str, set[str]] = defaultdict(set)
    for result in await results_on_log(settings):
        on_topic[result.request_id].add((result.status.value, result.text))
        finished_by[result.worker_id or ""].add(result.request_id)
    attempts: dict[str, int] = defaultdict(int)
    attempt_times: dict[str, list[float]] = defaultdict(list)
    attempted_by: dict[str, set[str]] = defaultdict(set)
    for event in await attempts_on_log(settings):
        attempts[event.request_id] += 1
        attempt_times[event.request_id].append(event.timings.admitted_at or 0.0)
        attempted_by[event.worker_id or ""].add(event.request_id)
    wanted = set(accepted)
    conflicting = [rid for rid in accepted if len(on_topic.get(rid, ())) > 1
                   or (rid in stored and on_topic.get(rid) and stored[rid] not in on_topic[rid])]
    statuses: dict[str, int] = defaultdict(int)
    for status, _text in stored.values():
        statuses[status] += 1
    return Report(
        accepted=len(accepted), lost=[rid for rid in accepted if rid not in stored], conflicting=conflicting,
        generations=sum(n for rid, n in attempts.items() if rid in wanted),
        generations_by_id={rid: n for rid, n in attempts.items() if rid in wanted}, statuses=dict(statuses),
        attempted_by=dict(attempted_by), finished_by=dict(finished_by),
        attempt_times={rid: sorted(t) for rid, t in attempt_times.items() if rid in wanted},
    )


def describe(report: Report) -> str:
    return json.dumps({"accepted": report.accepted, "lost": len(report.lost), "conflicting": len(report.conflicting),
                       "generations": report.generations, "regenerated": len(report.regenerated),
                       "statuses": report.statuses})


async def lagging(settings: InferlogSettings, group: str, topics: list[str],
                  timeout: float = 30) -> list[tuple[str, int, int, int]]:
    """The partitions of ``topics`` whose committed offset for ``group`` is below the high-water mark, as
    (topic, partition, committed, high-water). Reads the group's offsets without joining it."""
    consumer = make_consumer(settings.kafka_bootstrap, group)
    await consumer.start()
    try:
        tps = [TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t) or ())]
        assert tps, f"no partitions known for {topics}"
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        deadline = time.monotonic() + timeout
        while any(consumer.highwater(tp) is None for tp in tps):  # a fetch response carries the high-water
            await consumer.getmany(timeout_ms=200, max_records=1)
            assert time.monotonic() < deadline, "high-water marks not learned in time"
        out = []
        for tp in tps:
            committed, highwater = await consumer.committed(tp) or 0, consumer.highwater(tp) or 0
            if committed < highwater:
                out.append((tp.topic, tp.partition, committed, highwater))
        return out
    finally:
        await consumer.stop()
