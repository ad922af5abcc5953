"""The broker's epoch: which log the services read, so that a broker that lost its log is noticed.

Tansu keeps its log in memory: restarted, it is empty (topics, records and committed offsets gone), and
nothing on the wire says so. Measured on this machine (2026-12-04): it answers again 0.05 s after a
restart; a consumer's metadata refresh used to re-create its topic at Tansu's default of 4 partitions (a
6-partition topic came back with 4) and went on fetching, its positions silently reset; with auto-creation
refused (inferlog.kafka) the topics stay missing and a produce fails; DeleteTopics answers in 1 ms and the
topic can be re-created at once.

So a log's start is written down: ``inferlog topics`` creates the topics and, when it created any (a new
log) or found no marker, appends an epoch marker (a random ID and the layout) to the meta topic, and the
ledger records it. Every consuming service waits at start until the broker is *sound* (every topic with
its configured partitions, and a marker), then checks again every few seconds; when two checks in a row
find another broker (a topic missing or re-sized, no marker, another epoch) it exits with status 4 at once,
committing nothing more, so no work ever runs on a log it did not start on. Its supervisor restarts it,
and the new process waits for ``inferlog topics``, then reads the new log from its start (committed
offsets died with the old one). A broker that does not answer is an outage, never a changed broker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError
from pydantic import BaseModel, ConfigDict, ValidationError

from inferlog.errors import ConfigError
from inferlog.kafka import encode, make_producer
from inferlog.logscan import read_all
from inferlog.messages import now
from inferlog.topics import Topics, ensure_topics

log = logging.getLogger(__name__)

BROKER_CHANGED_EXIT = 4
"""A service's exit status when the broker is no longer the one whose log it was reading."""

UNREADABLE = (KafkaError, OSError, TimeoutError)
"""A broker that cannot be read: an outage, waited out; never taken for a changed broker."""


class EpochMarker(BaseModel):
    """``<prefix>.meta.v1``: a log started here (the last marker on the topic is the current epoch)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    schema_version: int = 1
    epoch: str
    written_at: float
    layout: dict[str, int]


@dataclass(frozen=True)
class BrokerState:
    epoch: str | None
    """The current marker's epoch; None when the broker holds none."""
    problems: tuple[str, ...]
    """What keeps the broker from being the one the layout describes (empty: sound)."""
    marker: EpochMarker | None = None

    @property
    def sound(self) -> bool:
        return not self.problems


async def inspect_broker(bootstrap: str, topics: Topics) -> BrokerState:
    """Every topic's presence and partition count, and the current marker. Raises one of ``UNREADABLE``
    when the broker cannot be read."""
    wanted = topics.layout()
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5_000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        problems = [f"topic {name} is missing" for name in wanted if name not in existing]
        present = [name for name in wanted if name in existing]
        for topic in await admin.describe_topics(present) if present else []:
            name, count = topic["topic"], len(topic["partitions"])
            if topic["error_code"] != 0:  # the broker could not say: unreadable, never "0 partitions"
                raise KafkaError(f"describing {name} failed with error {topic['error_code']}")
            if count != wanted[name]:
                problems.append(f"topic {name} has {count} partitions, not {wanted[name]}")
    finally:
        await admin.close()
    marker = None
    if topics.meta in existing:
        try:
            marker = await read_marker(bootstrap, topics)
        except ConfigError:  # deleted between the listing and the read
            problems.append(f"topic {topics.meta} is missing")
        else:
            if marker is None:
                problems.append(f"no epoch marker on {topics.meta}")
    return BrokerState(marker.epoch if marker else None, tuple(problems), marker)


async def read_marker(bootstrap: str, topics: Topics) -> EpochMarker | None:
    """The last readable marker on the meta topic (None if it holds none)."""
    latest = None
    for logged in await read_all(bootstrap, topics.meta, timeout_s=10.0):
        try:
            latest = EpochMarker.model_validate_json(logged.value or b"")
        except ValidationError:
            log.warning("record %d of %s is not an epoch marker: ignored", logged.offset, topics.meta)
    return latest


@dataclass(frozen=True)
class Prepared:
    """What ``prepare_broker`` did."""

    marker: EpochMarker
    new_epoch: bool
    created: tuple[str, ...]
    repaired: tuple[str, ...]


async def prepare_broker(bootstrap: str, topics: Topics, *, repair: bool = False) -> Prepared:
    """``inferlog topics``: create missing topics; with ``repair``, delete and re-create those whose
    partition count is wrong (their records are lost: the ledger re-drives them); then write a new epoch
    marker if a topic was created or repaired or none is there. Without ``repair`` a wrong count is a
    ConfigError naming the topic."""
    wanted = topics.layout()
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        created = tuple(name for name in wanted if name not in existing)
        present = [name for name in wanted if name in existing]
        described = await admin.describe_topics(present) if present else []
        unread = [t["topic"] for t in described if t["error_code"] != 0]
        if unread:  # a count it could not read is never a wrong one to repair
            raise ConfigError(f"the broker could not describe {', '.join(unread)}: nothing changed; try again")
        wrong = {t["topic"]: len(t["partitions"]) for t in described if len(t["partitions"]) != wanted[t["topic"]]}
        if wrong and not repair:  # refused before anything is created
            raise ConfigError("wrong partition counts: " + ", ".join(
                f"{name} has {count}, not {wanted[name]}" for name, count in wrong.items())
                + " (`inferlog topics --repair` deletes and re-creates them; their records are lost)")
        repaired = tuple(wrong)
        if repaired:
            log.warning("deleting and re-creating %s (wrong partition counts)", list(repaired))
            await admin.delete_topics(list(repaired))
            await _created(admin, {name: wanted[name] for name in repaired})
    finally:
        await admin.close()
    await ensure_topics(bootstrap, topics)  # creates the missing ones, checks every count
    marker = await read_marker(bootstrap, topics)
    if marker is not None and not created and not repaired:
        return Prepared(marker, False, created, repaired)
    marker = EpochMarker(epoch=uuid.uuid4().hex, written_at=now(), layout=wanted)
    producer = make_producer(bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topics.meta, encode(marker))
    finally:
        await producer.stop()
    log.info("broker epoch %s starts (created %s, repaired %s)", marker.epoch, list(created), list(repaired))
    return Prepared(marker, True, created, repaired)


async def _created(admin: AIOKafkaAdminClient, counts: dict[str, int], timeout_s: float = 10.0) -> None:
    """Create topics just deleted: the broker may still be removing them (error 36 until it has)."""
    deadline = time.monotonic() + timeout_s
    pending = dict(counts)
    while pending:
        response = await admin.create_topics([NewTopic(name, count, 1) for name, count in pending.items()])
        for name, code, message in response.topic_errors:
            if code == 0:
                pending.pop(name, None)
            elif code != 36 or time.monotonic() > deadline:
                raise ConfigError(f"could not re-create topic {name}: error {code} {message}")
        if pending:
            await asyncio.sleep(0.1)


def _exit_now(reason: str) -> None:
    log.error("exiting with status %d: %s; no more work runs or is committed on this broker, and the "
              "restarted service waits for `inferlog topics`", BROKER_CHANGED_EXIT, reason)
    logging.shutdown()
    os._exit(BROKER_CHANGED_EXIT)


class BrokerGuard:
    """A consuming service's check that the broker still holds the log it started on."""

    def __init__(self, bootstrap: str, topics: Topics, *, interval_s: float = 3.0,
                 on_change: Callable[[str], None] = _exit_now) -> None:
        self._bootstrap = bootstrap
        self._topics = topics
        self._interval_s = interval_s
        self._on_change = on_change

    async def wait_until_sound(self) -> str:
        """At start: wait until every topic is as configured and a marker is there; its epoch. Says what it
        waits for when it starts waiting and every 30 s."""
        said_at = None
        while True:
            try:
                state = await inspect_broker(self._bootstrap, self._topics)
            except UNREADABLE as exc:
                reason = f"the broker at {self._bootstrap} does not answer ({str(exc) or type(exc).__name__})"
            else:
                if state.sound and state.epoch is not None:
                    log.info("broker epoch %s", state.epoch)
                    return state.epoch
                reason = "; ".join(state.problems) + ": run `inferlog topics`"
            if said_at is None or time.monotonic() - said_at > 30:
                log.warning("waiting for the broker: %s", reason)
                said_at = time.monotonic()
            await asyncio.sleep(self._interval_s)

    def start_watching(self, epoch: str) -> asyncio.Task[None]:
        """``watch`` as a task (the service cancels it on the way out). A watch that fails for any reason but
        cancellation is a service running unguarded: that exits too."""
        task = asyncio.create_task(self.watch(epoch), name="broker-guard")

        def ended(done: asyncio.Task[None]) -> None:
            if not done.cancelled() and done.exception() is not None:
                self._on_change(f"the broker check failed: {done.exception()!r}")

        task.add_done_callback(ended)
        return task

    async def watch(self, epoch: str) -> None:
        """While the service runs: a check that reads another epoch's marker calls ``on_change`` at once (by
        default: exit with status 4); a missing or re-sized topic, or no marker, does after two checks in a
        row (a topic being re-created is briefly missing)."""
        strikes = 0
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                state = await inspect_broker(self._bootstrap, self._topics)
            except UNREADABLE as exc:
                log.debug("broker check could not read the broker (%r): an outage, not a new broker", exc)
                continue
            if state.sound and state.epoch == epoch:
                strikes = 0
                continue
            strikes += 1
            if strikes >= 2 or (state.epoch is not None and state.epoch != epoch):
                found = "; ".join(state.problems) or f"its epoch is {state.epoch}"
                self._on_change(f"the broker no longer holds epoch {epoch} ({found})")
                return
