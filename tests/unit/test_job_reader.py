"""Polls read Redis first, but never believe a stale copy of a job in progress (issue 8): the store's write
of its terminal status may have failed to reach Redis, and the job would look unfinished for minutes."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from inferlog.ledger import JobView
from inferlog.messages import Status
from inferlog_gateway.jobs import HOT_FRESH_S, Chunk, JobReader, StreamRestarted, stored_chunks


def _view(status: Status) -> JobView:
    return JobView(request_id="j", status=status, model="m", model_version=None, text=None, finish_reason=None,
                   prompt_tokens=None, completion_tokens=None, error=None, timings={}, tenant=None)


class Hot:
    def __init__(self, view: dict[str, Any]) -> None:
        self.view = view

    async def get(self, request_id: str) -> dict[str, Any]:
        return self.view

    async def put_many(self, views: list[dict[str, Any]]) -> None:
        """Forward only, by rank, as StatusCache's script writes."""
        for view in views:
            if view["rank"] >= self.view.get("rank", 0):
                self.view = {**view, "hot_at": time.time()}


class Ledger:
    reads = 0

    async def get(self, request_id: str) -> JobView:
        self.reads += 1
        return _view(Status.COMPLETED)


async def test_a_stale_hot_view_of_a_running_job_is_checked_against_postgres() -> None:
    ledger = Ledger()
    stale = {**_view(Status.RUNNING).to_hot(), "hot_at": time.time() - HOT_FRESH_S - 1}
    hot = Hot(stale)
    assert (await JobReader(ledger, hot).get("j")).status is Status.COMPLETED  # type: ignore[arg-type, union-attr]
    assert ledger.reads == 1
    assert hot.view["status"] == "completed", "the stale hot view was not moved forward to the stored result"


async def test_a_fresh_or_terminal_hot_view_is_answered_from_redis() -> None:
    ledger = Ledger()
    fresh = {**_view(Status.RUNNING).to_hot(), "hot_at": time.time()}
    assert (await JobReader(ledger, Hot(fresh)).get("j")).status is Status.RUNNING  # type: ignore[arg-type, union-attr]
    old_terminal = {**_view(Status.FAILED).to_hot(), "hot_at": 0}
    assert (await JobReader(ledger, Hot(old_terminal)).get("j")).status is Status.FAILED  # type: ignore[arg-type, union-attr]
    assert ledger.reads == 0


class HotStore(Hot):
    async def wait_done(self, request_id: str, timeout: float, is_done: Any) -> bool:
        if not await is_done():
            await asyncio.sleep(0.01)  # (the real one waits for the store's notification)
        return bool(await is_done())


class Deltas:
    """The worker's chunks of one attempt, then its end entry: it reaches Redis before the store's write."""

    def __init__(self, entries: list[dict[str, str]]) -> None:
        self.entries = [(f"{i + 1}-0", e) for i, e in enumerate(entries)]

    async def tail(self, request_id: str) -> str | None:
        return self.entries[-1][0] if self.entries else None

    async def read(self, request_id: str, after: str, block_ms: int | None) -> list[tuple[str, dict[str, str]]]:
        return [e for e in self.entries if after == "0" or int(e[0].split("-")[0]) > int(after.split("-")[0])]


async def test_a_stream_ends_only_once_every_read_answers_the_job_terminal() -> None:
    """The worker's end entry comes before the store has written the result; the reader waits for the store
    and moves a hot view still saying running forward, so a poll right after ``done`` cannot say running."""
    done = JobView(**{**_view(Status.COMPLETED).__dict__, "text": "abcdef", "chunks": (2, 4, 6)})

    class Store:
        terminal = False

        async def get(self, request_id: str) -> JobView:
            return done if self.terminal else _view(Status.RUNNING)

    store = Store()
    hot = HotStore({**_view(Status.RUNNING).to_hot(), "hot_at": time.time()})
    deltas = Deltas([{"d": "ab", "n": "1", "a": "w/1"}, {"d": "cd", "n": "2", "a": "w/1"}, {"end": "completed"}])
    reader = JobReader(store, hot, deltas=deltas)  # type: ignore[arg-type]
    items = reader.chunks("j")
    assert [(c.seq, c.text) for c in [await anext(items), await anext(items)]] == [(1, "ab"), (2, "cd")]
    ending = asyncio.ensure_future(anext(items))
    await asyncio.sleep(0.05)
    assert not ending.done(), "the stream went on past the end entry before the store held the result"
    store.terminal = True
    chunk = await asyncio.wait_for(ending, timeout=2)
    assert (chunk.seq, chunk.text) == (3, "ef"), "the chunk the live stream lacked was not taken from the result"
    assert await anext(items) == done
    assert (await reader.get("j")).status is Status.COMPLETED  # type: ignore[union-attr]


async def test_a_stream_never_joins_two_attempts_text() -> None:
    """A takeover regenerates, numbering its chunks from 1 again, and with sampling its text differs ("XX"
    where the stored attempt said "cd"): a reader follows the stored attempt alone, or, holding the other
    attempt's chunks, gets StreamRestarted instead of a text that is neither."""
    stored = JobView(**{**_view(Status.COMPLETED).__dict__, "text": "abcdef", "chunks": (2, 4, 6), "attempt": "w2/1"})

    class Store:
        async def get(self, request_id: str) -> JobView:
            return stored

    entries = [{"d": "ab", "n": "1", "a": "w1/1"}, {"d": "ab", "n": "1", "a": "w2/1"},
               {"d": "XX", "n": "2", "a": "w1/1"}, {"d": "cd", "n": "2", "a": "w2/1"},
               {"d": "ef", "n": "3", "a": "w2/1"}, {"end": "completed", "a": "w2/1"}]

    async def read(after: int = 0, attempt: str | None = None, stream: list[dict[str, str]] | None = None) -> list[Any]:
        reader = JobReader(Store(), HotStore({}), deltas=Deltas(entries if stream is None else stream))  # type: ignore[arg-type]
        return [(c.seq, c.text) if isinstance(c, Chunk) else "end"
                async for c in reader.chunks("j", after=after, attempt=attempt)]

    assert await read() == [(1, "ab"), (2, "cd"), (3, "ef"), "end"]  # the newest attempt only
    assert await read(after=1, attempt="w2/1") == [(2, "cd"), (3, "ef"), "end"]
    with pytest.raises(StreamRestarted):  # the client's chunk 1: whose? two attempts streamed
        await read(after=1)
    with pytest.raises(StreamRestarted):
        await read(after=1, attempt="w1/1")
    # The live stream gone (expired): the stored result's attempt decides.
    assert await read(after=2, attempt="w2/1", stream=[]) == [(3, "ef"), "end"]
    with pytest.raises(StreamRestarted):
        await read(after=2, attempt="w1/1", stream=[])
    # One attempt streamed so far: a resume without the attempt is that attempt's.
    assert await read(after=1, stream=entries[1:2] + entries[3:]) == [(2, "cd"), (3, "ef"), "end"]

    # Live: this connection sent the first attempt's chunk, then a takeover's chunks appear.
    live = Deltas([{"d": "ab", "n": "1", "a": "w1/1"}])
    reader = JobReader(Store(), HotStore({**_view(Status.RUNNING).to_hot(), "hot_at": time.time()}), deltas=live)  # type: ignore[arg-type]
    items = reader.chunks("j")
    assert (await anext(items)).text == "ab"  # type: ignore[union-attr]
    live.entries.append(("2-0", {"d": "ab", "n": "1", "a": "w2/1"}))
    with pytest.raises(StreamRestarted):
        await anext(items)


def test_stored_chunks_cut_the_text_where_the_worker_did_and_never_fail_on_bad_ends() -> None:
    def cut(text: str | None, ends: tuple[int, ...] | None, after: int = 0) -> list[tuple[int, str]]:
        view = JobView(**{**_view(Status.COMPLETED).__dict__, "text": text, "chunks": ends})
        return [(c.seq, c.text) for c in stored_chunks(view, after)]

    assert cut("abcdef", (2, 4, 6)) == [(1, "ab"), (2, "cd"), (3, "ef")]
    assert cut("abcdef", (2, 4, 6), after=2) == [(3, "ef")]
    assert cut("abcdef", (2, 4, 6), after=3) == []
    assert cut("abcdef", None) == [(1, "abcdef")]  # nothing was streamed: the whole text is chunk 1
    assert cut("abcdef", (4, 2, 99)) == [(1, "abcd"), (2, ""), (3, "ef")]  # clamped, never out of order
    assert cut("abcdef", (2,), after=1) == [(2, "cdef")]  # text past the last end
    assert cut(None, (2,)) == [] and cut("", None) == []
