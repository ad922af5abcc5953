"""``inferlog up``: the whole stack on one machine, as child processes.

Order: broker (started here when none answers at the bootstrap address), migrations, model preparation,
topics and the broker epoch, the re-drive of the accepted jobs an earlier broker log took with it (Tansu
keeps its log in memory: every ``up`` that starts it starts an empty log; ``INFERLOG_REDRIVE_ON_UP``),
then the services downstream-first (result-store, gpu-worker, tokenizer, gateway), each waited
for until ready (the worker's load hash in Redis, the consumer groups Stable, the gateway's /readyz), so
that when the gateway URL is printed a submit goes all the way through without waiting for a group join
(~4 s on Tansu). Ctrl-C or
SIGTERM stops them in the reverse order (each finishes and commits within its grace period), and ``up``
says how many accepted jobs are unfinished and what becomes of them. Once up, a
service that dies is restarted with backoff, as a process supervisor would; one that dies while the stack
is still starting stops it, and ``up`` exits non-zero.

With no Postgres or Redis configured and none answering on the default ports, embedded ones are started
(inferlog.embedded; Postgres keeps its data in the cache directory, so the ledger survives restarts).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

import asyncpg
from aiokafka.errors import KafkaError
from redis import Redis

from inferlog import broker
from inferlog.config import EMBEDDED, InferlogSettings
from inferlog.db import migrate
from inferlog.embedded import EmbeddedPostgres, EmbeddedRedis
from inferlog.epoch import Prepared, prepare_broker
from inferlog.errors import ConfigError, InferlogError, StoreUnavailable
from inferlog.hot import Keys
from inferlog.models import ModelRegistry, prepare
from inferlog.operate import count_open, record_epoch, recover_on_up
from inferlog.topics import Topics, group_is_consuming

log = logging.getLogger("inferlog.up")

STOP_GRACE_S = 40.0
RESET_AFTER_S = 60.0
MAX_BACKOFF_S = 30.0


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    started_at: float = 0.0
    failures: int = 0
    """Consecutive early exits: the restart backoff doubles with each."""
    restart_at: float | None = None


class Stack:
    def __init__(self, settings: InferlogSettings, *, gateway_host: str, gateway_port: int,
                 worker_id: str = "local-worker-1") -> None:
        self.settings = settings
        self.gateway_url = f"http://{gateway_host}:{gateway_port}"
        self._worker_id = worker_id
        self._env = dict(os.environ, INFERLOG_WORKER_WORKER_ID=worker_id,
                         INFERLOG_GATEWAY_HOST=gateway_host, INFERLOG_GATEWAY_PORT=str(gateway_port))
        self.children: list[Child] = []
        self._broker: subprocess.Popen[bytes] | None = None
        self._embedded: list[EmbeddedPostgres | EmbeddedRedis] = []
        self._ledger_ready = False

    # -- bring-up -------------------------------------------------------------------------------------------

    def up(self) -> None:
        s = self.settings
        host, port = broker.parse_bootstrap(s.kafka_bootstrap)
        if broker.port_answers(host, port):
            log.info("using the broker at %s", s.kafka_bootstrap)
        elif host in ("127.0.0.1", "localhost", "::1"):
            log.info("no broker at %s: starting Tansu (in-memory log)", s.kafka_bootstrap)
            self._broker = broker.start_tansu(host, port)
            print(f"broker pid={self._broker.pid} (tansu on {host}:{port})", flush=True)
        else:
            raise ConfigError(f"no broker answers at {s.kafka_bootstrap}")
        self._resolve_stores()
        s = self.settings
        try:
            applied = asyncio.run(migrate(s.postgres_url, s.postgres_schema))
        except StoreUnavailable as exc:
            raise ConfigError(f"{exc} (a configured Postgres that does not answer is never replaced by an "
                              "empty embedded one; fix the URL or unset INFERLOG_POSTGRES_URL)") from exc
        log.info("database schema %s ready (%d migrations applied)", s.postgres_schema, len(applied))
        self._check_redis()
        for model in ModelRegistry(s):
            if not model.is_prepared:
                print(f"preparing model {model.name} (once; cached in {model.directory})", flush=True)
            prepare(model)
        self._recover(asyncio.run(self._prepare_broker()))
        self._spawn("result-store")
        self._spawn("gpu-worker")
        self._wait_until(self._worker_ready, "gpu-worker", timeout=300)
        self._spawn("tokenizer")
        self._wait_until(lambda: self._group_ready("result-store"), "result-store", timeout=60)
        self._wait_until(lambda: self._group_ready("tokenizer"), "tokenizer", timeout=60)
        self._spawn("gateway")
        self._wait_until(self._gateway_ready, "gateway", timeout=60)

    async def _prepare_broker(self) -> Prepared:
        """The topics and the broker's epoch marker (``inferlog topics``), recorded in the ledger."""
        prepared = await prepare_broker(self.settings.kafka_bootstrap, Topics.from_settings(self.settings))
        await record_epoch(self.settings, prepared)
        self._ledger_ready = True
        return prepared

    def _recover(self, prepared: Prepared) -> None:
        """Before serving: the accepted jobs an earlier broker log took with it back on this one (``inferlog
        redrive``), or, with the re-drive turned off, how many wait for it."""
        s = self.settings
        if not s.redrive_on_up:
            try:
                waiting = asyncio.run(count_open(s)).awaiting_redrive
            except InferlogError as exc:
                raise ConfigError(f"the jobs waiting for `inferlog redrive` could not be counted: {exc}") from exc
            if waiting:
                print(f"{waiting:,} accepted jobs from an earlier broker log wait for `inferlog redrive` "
                      "(INFERLOG_REDRIVE_ON_UP is off); they hold no admission slot meanwhile", flush=True)
            return
        try:
            report = asyncio.run(recover_on_up(s, prepared, others_may_consume=self._broker is None))
        except (InferlogError, KafkaError, OSError, asyncpg.PostgresError) as exc:
            raise ConfigError(f"re-driving the previous run's unfinished jobs failed: {exc or type(exc).__name__} "
                              "(nothing is lost: run `inferlog up` again, or `inferlog redrive`)") from exc
        if report.redriven or report.missing_payload:
            notes = [f"{len(report.deadline_passed):,} past their deadline end expired"] if report.deadline_passed else []
            if report.missing_payload:
                notes.append(f"{len(report.missing_payload):,} without a stored payload ended failed (payload_lost)")
            print(f"re-driven {len(report.redriven):,} jobs from the previous run into broker epoch {report.epoch}"
                  + (f" ({'; '.join(notes)})" if notes else ""), flush=True)

    def _resolve_stores(self) -> None:
        """Use the configured stores; with none configured, the local ones if they answer, else embedded
        ones (``embedded`` forces that). Children get the resolved URLs."""
        s = self.settings
        pg_url, redis_url = s.postgres_url, s.redis_url
        if pg_url == EMBEDDED or ("postgres_url" not in s.model_fields_set
                                  and not broker.port_answers("127.0.0.1", 5432)):
            pg = EmbeddedPostgres(s.cache_dir / "postgres", broker.free_port())
            pg_url = pg.start()
            self._embedded.append(pg)
            print(f"postgres pid={pg.proc.pid if pg.proc else '?'} (embedded, {pg_url}, data in {pg.data_dir})",
                  flush=True)
        if redis_url == EMBEDDED or ("redis_url" not in s.model_fields_set
                                     and not broker.port_answers("127.0.0.1", 6379)):
            redis = EmbeddedRedis(broker.free_port())
            redis_url = redis.start()
            self._embedded.append(redis)
            print(f"redis pid={redis.proc.pid if redis.proc else '?'} (embedded, {redis_url})", flush=True)
        self.settings = s.model_copy(update={"postgres_url": pg_url, "redis_url": redis_url})
        self._env.update(INFERLOG_POSTGRES_URL=pg_url, INFERLOG_REDIS_URL=redis_url)

    def _check_redis(self) -> None:
        client = Redis.from_url(self.settings.redis_url, socket_connect_timeout=2)
        try:
            client.ping()
        except Exception as exc:  # redis raises several connection error types
            raise ConfigError(f"Redis at {self.settings.redis_url} did not answer: {exc}") from exc
        finally:
            client.close()

    def _spawn(self, service: str) -> None:
        self.children.append(Child(service, self._start(service), time.monotonic()))

    def _start(self, service: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-m", "inferlog.cli", "run", service], env=self._env)
        print(f"{service} pid={proc.pid}", flush=True)
        return proc

    def _wait_until(self, ready, name: str, timeout: float) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_children()
            if ready():
                return
            time.sleep(0.2)
        raise ConfigError(f"{name} was not ready after {timeout:.0f}s")

    def _worker_ready(self) -> bool:
        client = Redis.from_url(self.settings.redis_url, socket_connect_timeout=2)
        try:
            return bool(client.exists(Keys(self.settings.redis_prefix).worker(self._worker_id)))
        finally:
            client.close()

    def _group_ready(self, service: str) -> bool:
        group = Topics.from_settings(self.settings).group(service)
        return asyncio.run(group_is_consuming(self.settings.kafka_bootstrap, group))

    def _gateway_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.gateway_url}/readyz", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    # -- running and stopping -------------------------------------------------------------------------------

    def _check_children(self) -> None:
        for child in self.children:
            code = child.proc.poll()
            if code is not None:
                raise ConfigError(f"{child.name} (pid {child.proc.pid}) exited with code {code}")

    def wait(self, stop: list[bool]) -> None:
        """Supervise until stopped: a service that exits is restarted, after a backoff that doubles with
        each exit within a minute of its start (1 s, 2 s, … 30 s) and resets once it stays up."""
        while not stop:
            now = time.monotonic()
            for child in self.children:
                code = child.proc.poll()
                if code is None:
                    if now - child.started_at > RESET_AFTER_S:
                        child.failures = 0
                    continue
                if child.restart_at is None:
                    child.failures = child.failures + 1 if now - child.started_at < RESET_AFTER_S else 1
                    delay = min(2.0 ** (child.failures - 1), MAX_BACKOFF_S)
                    child.restart_at = now + delay
                    print(f"{child.name} (pid {child.proc.pid}) exited with code {code}; restarting in "
                          f"{delay:.0f}s", flush=True)
                elif now >= child.restart_at:
                    child.proc, child.started_at, child.restart_at = self._start(child.name), now, None
            time.sleep(0.2)

    def down(self) -> None:
        for child in reversed(self.children):
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for child in reversed(self.children):
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in time: killing it", child.name)
                child.proc.kill()
                child.proc.wait()
        self._say_what_is_left()
        if self._broker is not None:
            self._broker.terminate()
            try:
                self._broker.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._broker.kill()
        for store in reversed(self._embedded):
            store.stop()


    def _say_what_is_left(self) -> None:
        """On stop: how many accepted jobs are unfinished, and what becomes of them."""
        if not self._ledger_ready:
            return
        try:
            count = asyncio.run(count_open(self.settings))
        except Exception as exc:  # noqa: BLE001 - whatever it is, the broker and stores must still be stopped
            print(f"the unfinished jobs could not be counted: {exc or type(exc).__name__}", flush=True)
            return
        unfinished = count.in_flight + count.awaiting_redrive
        if not unfinished:
            return
        if self._broker is None:
            then = f"their records stay on the broker at {self.settings.kafka_bootstrap}"
            if count.awaiting_redrive:
                then += f" ({count.awaiting_redrive:,} of them wait for `inferlog redrive`: an earlier log held them)"
        elif self.settings.redrive_on_up:
            then = "the in-memory broker log goes with this stop: the next `inferlog up` re-drives them"
        else:
            then = ("the in-memory broker log goes with this stop: run `inferlog redrive` after the next "
                    "`inferlog up` (INFERLOG_REDRIVE_ON_UP is off)")
        print(f"{unfinished:,} accepted jobs are unfinished; {then}", flush=True)


def up(settings: InferlogSettings, gateway_host: str, gateway_port: int) -> int:
    stack = Stack(settings, gateway_host=gateway_host, gateway_port=gateway_port)
    stop: list[bool] = []

    def _stop(signum: int, _frame: object) -> None:
        stop.append(True)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:
        stack.up()
        print(f"inferlog is up: {stack.gateway_url}", flush=True)
        print(f"  try: curl -X POST {stack.gateway_url}/v1/requests -H 'content-type: application/json' "
              "-d '{\"messages\":[{\"role\":\"user\",\"content\":\"What is the capital of France?\"}],"
              "\"max_tokens\":32}'", flush=True)
        stack.wait(stop)
        return 0
    except KeyboardInterrupt:
        return 0
    except ConfigError as exc:
        print(f"inferlog up: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stack.down()
        print("inferlog is down", flush=True)
