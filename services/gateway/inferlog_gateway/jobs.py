"""Reading, waiting on and cancelling jobs: Redis first (hot status, notifications, deltas), Postgres as
the source of truth and the fallback whenever Redis misses or is down (DESIGN.md, contract 6)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from redis.exceptions import RedisError

from inferlog.breakers import CircuitBreaker
from inferlog.errors import NotFound
from inferlog.hot import CancelFlags, DeltaStream, StatusCache
from inferlog.identity import client_id_of
from inferlog.ledger import JobView, RequestLedger
from inferlog.messages import now

log = logging.getLogger(__name__)

POLL_FALLBACK_S = 0.5
HOT_FRESH_S = 5.0
"""A hot view of a job still in progress older than this is checked against Postgres: the store's later
write (its terminal status) may have failed to reach Redis."""


class JobReader:
    def __init__(self, ledger: RequestLedger, hot: StatusCache | None = None, cancels: CancelFlags | None = None,
                 deltas: DeltaStream | None = None) -> None:
        self._ledger = ledger
        self._hot = hot
        self._cancels = cancels
        self._deltas = deltas
        # A Redis that hangs (not refusing, just silent) would cost every poll its socket timeout: after
        # three failures, skip Redis for ten seconds and go straight to the fallbacks.
        self._redis = CircuitBreaker("redis", threshold=3, ttl_s=10.0,
                                     counts=lambda exc: isinstance(exc, (RedisError, OSError)))

    def _guard(self):  # type: ignore[no-untyped-def]
        return self._redis.guard(lambda: RedisError("Redis circuit is open"))

    async def get(self, request_id: str) -> JobView | None:
        if self._hot is not None:
            try:
                async with self._guard():
                    hot = await self._hot.get(request_id)
                if hot is not None and (hot.get("terminal") or now() - float(hot.get("hot_at", 0)) < HOT_FRESH_S):
                    return JobView.from_hot(hot)
            except (RedisError, OSError) as exc:
                log.warning("hot status unavailable, reading Postgres: %s", exc)
        return await self._forwarded(await self._ledger.get(request_id))

    async def wait(self, request_id: str, wait_s: float) -> JobView | None:
        """The job once terminal, or as it stands after ``wait_s``. Holds no worker resource: it waits on
        the result-store's Redis notification (or, with Redis down, polls Postgres)."""
        job = await self.get(request_id)
        if job is None or job.status.is_terminal() or wait_s <= 0:
            return job

        async def terminal_in_store() -> bool:
            view = await self._ledger.get(request_id)
            return view is not None and view.status.is_terminal()

        try:
            if self._hot is None:
                raise RedisError("no Redis configured")
            async with self._guard():
                await self._hot.wait_done(request_id, wait_s, terminal_in_store)
        except (RedisError, OSError):
            deadline = asyncio.get_running_loop().time() + wait_s
            while asyncio.get_running_loop().time() < deadline and not await terminal_in_store():
                await asyncio.sleep(POLL_FALLBACK_S)
        return await self._forwarded(await self._ledger.get(request_id))

    async def _forwarded(self, job: JobView | None) -> JobView | None:
        """A terminal job read from Postgres, after moving its hot view forward to it: the store writes Redis
        after Postgres, and once a client has seen the job ended (a wait, a stream's end) no read may answer
        an earlier status from a hot view not yet written (forward only: a later status is never undone)."""
        if job is not None and job.status.is_terminal() and self._hot is not None:
            try:
                async with self._guard():
                    await self._hot.put_many([job.to_hot()])
            except (RedisError, OSError) as exc:
                log.warning("hot view of %s not moved to %s (%s): polls read Postgres once it is stale",
                            job.request_id, job.status.value, exc)
        return job

    async def cancel(self, request_id: str) -> JobView | None:
        """Flag the job cancelled in the ledger (durable) and notify the workers (Redis). The stage that
        holds the job then ends it ``cancelled``; a job already terminal stays as it is."""
        job = await self._ledger.request_cancel(request_id, now())
        if job is not None and not job.status.is_terminal() and self._cancels is not None:
            try:
                async with self._guard():
                    await self._cancels.raise_flag(request_id)
            except (RedisError, OSError) as exc:
                log.warning("cancel of %s recorded in the ledger only (Redis: %s)", request_id, exc)
        return job

    async def settled(self, request_id: str) -> JobView:
        """The job once the store holds its terminal result, however long that takes, read from Postgres and
        answered by every read from then on (``wait`` moves the hot view forward; should Redis refuse that,
        this waits until a hot view still saying otherwise is too old to be believed), so a stream's end is
        never followed by a poll that says the job still runs, on this gateway or any other."""
        while True:
            job = await self.wait(request_id, WAIT_STEP_S)
            if job is None:
                raise NotFound(f"No request with id {client_id_of(request_id)!r}.", param="request_id")
            if job.status.is_terminal():
                break
            await asyncio.sleep(POLL_FALLBACK_S)  # (a wait that returns at once must not spin)
        if self._hot is not None and not await self._hot_agrees(job):
            await asyncio.sleep(HOT_FRESH_S)  # every reader checks Postgres behind a hot view this old
        return job

    async def _hot_agrees(self, job: JobView) -> bool:
        try:
            async with self._guard():
                hot = await self._hot.get(job.request_id) if self._hot is not None else None
        except (RedisError, OSError):
            return False
        return hot is None or bool(hot.get("terminal"))

    async def chunks(self, request_id: str, after: int = 0, attempt: str | None = None
                     ) -> AsyncIterator[Chunk | JobView]:
        """The job's text in the worker's numbered chunks after chunk ``after``, live while it generates,
        then its terminal view (``settled``: only once every read answers it). Chunks the live stream lacks
        (it expired, lost entries or never existed: no Redis) come from the chunk ends kept with the result.
        ``attempt``: the attempt the client's first ``after`` chunks came from, if it knows (the native stream
        says). Text is never joined across attempts: a takeover regenerates, and with sampling its text
        differs; where the client holds another attempt's chunks, ``StreamRestarted`` is raised instead."""
        follow = _Follow(request_id, sent=after, attempt=attempt)
        if self._deltas is not None:
            try:
                async for chunk in self._live(request_id, follow):
                    yield chunk
            except (RedisError, OSError) as exc:
                log.warning("stream of %s degrades to the stored result: %s", request_id, exc)
        job = await self.settled(request_id)
        if job.chunks is None:
            # A hot view: the chunk ends and attempt are kept in Postgres only. Unreadable, the stream breaks
            # (raises) rather than number the rest wrongly: its client resumes with the cursor it has.
            job = await self._ledger.get(request_id) or job
        if follow.sent and follow.attempt and job.attempt and job.attempt != follow.attempt:
            raise StreamRestarted(job.request_id)
        for chunk in stored_chunks(job, after=follow.sent):
            yield chunk
        yield job

    async def _live(self, request_id: str, follow: _Follow) -> AsyncIterator[Chunk]:
        """The live stream's chunks after ``follow.sent``, until its end entry, a gap in its numbering (entries
        Redis did not take) or, when no entry comes, the job found terminal. A reader holding no chunk yet
        follows the newest attempt the stream holds (each attempt numbers from 1); one that holds chunks
        (sent here, or the client's cursor) gets ``StreamRestarted`` when another attempt appears."""
        assert self._deltas is not None
        backlog, last = [], "0"
        async with self._guard():
            tail = await self._deltas.tail(request_id)
        while tail is not None and _stream_id(last) < _stream_id(tail):
            # What the stream held when the reader came, to know its newest attempt before sending anything
            # (up to that tail: a stream growing faster than these reads would never end the scan).
            async with self._guard():
                entries = await self._deltas.read(request_id, last, block_ms=None)
            if not entries:
                break
            backlog += entries
            last = entries[-1][0]
        attempts = list(dict.fromkeys(f.get("a", "") for _, f in backlog if "d" in f))
        if attempts:
            if follow.attempt is None and follow.sent and len(attempts) > 1:
                raise StreamRestarted(request_id)  # whose chunks does the client hold? unknown
            if follow.attempt is not None and follow.sent and follow.attempt != attempts[-1]:
                raise StreamRestarted(request_id)
            follow.attempt = attempts[-1] if follow.attempt is None else follow.attempt
            follow.superseded.update(attempts[:-1])
        while True:
            for entry_id, fields in backlog:
                last = entry_id
                step = follow.take(fields)
                if step is _END or step is _GAP:
                    return
                if isinstance(step, Chunk):
                    yield step
            if not backlog:
                current = await self.get(request_id)  # (hot first: a waiting stream costs Postgres nothing)
                if current is None or current.status.is_terminal():
                    return
            async with self._guard():
                backlog = await self._deltas.read(request_id, last, block_ms=1000)


WAIT_STEP_S = 60.0


def _stream_id(entry_id: str) -> tuple[int, int]:
    millis, _, seq = entry_id.partition("-")
    return int(millis), int(seq or 0)


_END, _GAP = object(), object()
"""What ``_Follow.take`` answers besides a chunk: the attempt's stream ended, or a chunk is missing."""


class StreamRestarted(Exception):
    """The job's generation started again (a worker's attempt was taken over) after the client received
    chunks of the earlier attempt: the rest would join two attempts' text, so the stream ends instead."""

    def __init__(self, request_id: str) -> None:
        super().__init__(f"The generation of {client_id_of(request_id)!r} restarted (a worker failed) after this "
                         "stream's chunks: its text may differ from them. Fetch the stored result, or stream it "
                         "again from the start.")


@dataclass
class _Follow:
    """A stream reader's position: the chunks the client holds (``sent``) and whose attempt they are."""

    request_id: str
    sent: int
    attempt: str | None
    superseded: set[str] = field(default_factory=set)

    def take(self, fields: dict[str, str]) -> Chunk | object | None:
        """One stream entry: the next chunk to send, ``_END``, ``_GAP`` (a chunk is missing: the stored
        result has it), or None (nothing to send)."""
        attempt = fields.get("a", "")
        if "end" in fields:
            if attempt in self.superseded and attempt:
                return None  # (an older attempt's end: it published nothing the reader follows)
            if self.sent and self.attempt and attempt and attempt != self.attempt:
                raise StreamRestarted(self.request_id)
            return _END
        if "d" not in fields or not fields.get("n", "").isascii() or not fields.get("n", "").isdigit() \
                or attempt in self.superseded:
            return None
        if attempt != self.attempt:
            if self.sent and self.attempt is not None:
                raise StreamRestarted(self.request_id)
            if self.attempt is not None:
                self.superseded.add(self.attempt)
            self.attempt = attempt
        seq = int(fields["n"])
        if seq <= self.sent:
            return None
        if seq != self.sent + 1:
            return _GAP
        self.sent = seq
        return Chunk(seq, fields["d"], attempt)


@dataclass(frozen=True)
class Chunk:
    seq: int
    """The worker's sequence number, from 1: a stream resumes after it (``starting_after``)."""
    text: str
    attempt: str | None = None


def stored_chunks(job: JobView, after: int = 0) -> list[Chunk]:
    """The stored text cut where the worker's chunks ended, after chunk ``after``; the whole text is chunk 1
    when no boundaries were kept. Boundaries are clamped to the text, so a bad one cannot fail a stream."""
    text = job.text or ""
    if not text:
        return []
    ends = list(job.chunks or ()) or [len(text)]
    chunks, start = [], 0
    for seq, end in enumerate(ends, start=1):
        end = min(max(end, start), len(text))
        if seq > after:
            chunks.append(Chunk(seq, text[start:end], job.attempt))
        start = end
    if start < len(text) and len(ends) + 1 > after:
        chunks.append(Chunk(len(ends) + 1, text[start:], job.attempt))  # text past the last kept end (never sent live)
    return chunks
