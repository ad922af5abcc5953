"""A streamed response's events are numbered from the job's chunks, so a number means the same event on every
replay (issue 12): a client resuming after any event gets exactly the events after it, the terminal one
included, whether the job completed or failed after streaming some chunks."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from inferlog.ledger import JobView
from inferlog.messages import Status
from inferlog_gateway.jobs import Chunk, stored_chunks
from inferlog_gateway.responses_routes import _numbered


def _job(status: Status, text: str | None, chunks: tuple[int, ...] | None) -> JobView:
    return JobView(request_id="r", status=status, model="m", model_version=None, text=text, finish_reason="stop",
                   prompt_tokens=3, completion_tokens=3, error=None, timings={}, tenant=None, chunks=chunks)


class Reader:
    """What JobReader.chunks gives: the live chunks after ``after`` (``streamed`` of them reached Redis), then
    the stored ones the live stream lacked, then the job."""

    def __init__(self, job: JobView, streamed: list[str]) -> None:
        self.job, self.streamed = job, streamed

    async def get(self, key: str) -> JobView:
        return self.job

    async def chunks(self, key: str, after: int = 0) -> AsyncIterator[Chunk | JobView]:
        sent = after
        for seq, text in enumerate(self.streamed, start=1):
            if seq > after:
                sent = seq
                yield Chunk(seq, text)
        for chunk in stored_chunks(self.job, after=sent):
            yield chunk
        yield self.job


async def _events(reader: Reader, after: int) -> list[tuple[int, str]]:
    return [(seq, kind) async for seq, kind, _ in _numbered(reader, "r", after) if seq > after]  # type: ignore[arg-type]


@pytest.mark.parametrize(("job", "streamed"), [
    (_job(Status.COMPLETED, "abcdef", (2, 4, 6)), ["ab", "cd", "ef"]),
    (_job(Status.COMPLETED, "", None), []),  # the first token ended it: an empty text, nothing streamed
    (_job(Status.FAILED, None, None), ["ab", "cd", "ef"]),  # an earlier attempt streamed; no text, no ends
    (_job(Status.FAILED, None, (2, 4, 6)), ["ab", "cd", "ef"])])
async def test_every_resume_gets_exactly_the_events_after_its_cursor(job: JobView, streamed: list[str]) -> None:
    reader = Reader(job, streamed)
    whole = await _events(reader, -1)
    assert [seq for seq, _ in whole] == list(range(len(whole)))
    assert whole[-1][1] == ("response.completed" if job.status is Status.COMPLETED else "response.failed")
    for after in range(len(whole) - 1):  # (a client that had the terminal event is done)
        assert await _events(reader, after) == whole[after + 1:], after
    if job.text is not None or job.chunks is not None:  # (a count known from the result alone)
        assert await _events(reader, len(whole) - 1) == []
