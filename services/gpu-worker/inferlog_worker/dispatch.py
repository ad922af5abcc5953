"""GpuWorker: the worker's dispatch core. Fetch what admission has room for, start it on the runner, publish
each result, and commit past it only once the broker has acknowledged that result.

It is transport-free: it talks to the log, the publisher, the ledger, the leases, the cancel flags, the
delta stream, the load report and the engine through the small protocols of ``inferlog_worker.ports``,
and imports none of aiokafka, redis, asyncpg, torch or transformers (a test checks). The Kafka/Redis
shell (``inferlog_worker.shell``, wired in ``main``) adapts the real ones; the tests use fakes.

    fetch (TierConsumer) → triage → KvAdmission → ModelRunner → results topic (acked) → finish → commit

Nothing here blocks the event loop: generation runs on the manager's thread, and the loop only moves
records, so consumer-group heartbeats keep their schedule however long a generation takes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Literal

from pydantic import ValidationError

from inferlog.errors import SideChannelUnavailable, StoreUnavailable
from inferlog.leasing import LeaseState, Renewal
from inferlog.messages import (
    FINISH_STATUS,
    DispatchFacts,
    ErrorInfo,
    EventRecord,
    Priority,
    ResultRecord,
    Status,
    TokenizedRecord,
    Usage,
    dead_letter,
    ended,
    now,
)
from inferlog.topics import Topics
from inferlog_worker.admission import KvAdmission
from inferlog_worker.ports import (
    CancelPort,
    DeltaPort,
    FetchedRecord,
    LeasePort,
    LedgerPort,
    LoadPort,
    LoadSnapshot,
    LogPort,
    Outgoing,
    Position,
    Publisher,
)
from inferlog_worker.runner import EngineFailed, GenerationDone, GenerationJob, ModelRunner

log = logging.getLogger(__name__)

DELTA_DRAIN_S = 3.0
"""On the way out, how long the delta flusher may take to send what waits."""


Verdict = Literal["run", "done", "watch", "defer"] | list[Outgoing]
"""Preflight's decision for one admitted request (see ``GpuWorker._preflight``)."""
WorkState = Literal["waiting", "admitted", "running", "publishing", "watching"]
"""waiting: queued for KV room · admitted: in preflight or recording its attempt · running: in the engine ·
publishing: its result is being handed on · watching: another worker's lease holds it."""


@dataclass
class _Work:
    record: TokenizedRecord
    positions: list[tuple[Position, int]] = field(default_factory=list)
    """Every fetched copy of this request (a re-delivery while it runs joins the running one)."""
    state: WorkState = "waiting"
    lease: str | None = None
    """This attempt's lease value, once preflight has taken (or, Redis being down, meant to take) it."""
    cancelled: bool = False
    """A cancel arrived while it was admitted but not yet in the engine."""
    lost: bool = False
    """Another worker holds its lease now: this attempt publishes nothing."""
    retries: int = 0
    """Preflights that could not decide (a store unreachable) or attempts that broke before the engine."""
    suspect: bool = False
    """It was in an engine failure: it runs alone (quarantine), and suspects go before other work."""
    chunk_ends: list[int] = field(default_factory=list)
    """Where each text chunk this attempt streamed ended (chunk N, the stream's sequence number N, ends at
    ``chunk_ends[N-1]``); kept with the result so a stream cursor outlives the live stream."""


@dataclass
class SideChannels:
    """The worker's state channels (DESIGN.md). Each is optional: a worker without them still generates,
    commits and publishes results; it only loses the guard, the signal or the stream that one gives."""

    ledger: LedgerPort | None = None
    """Terminal-result check before generating (and while watching another worker's lease)."""
    leases: LeasePort | None = None
    cancels: CancelPort | None = None
    deltas: DeltaPort | None = None


class GpuWorker:
    def __init__(self, *, worker_id: str, runner: ModelRunner, consumer: LogPort,
                 publisher: Publisher, topics: Topics, admission: KvAdmission[_Work],
                 load: LoadPort | None = None, load_interval_s: float = 1.0,
                 shutdown_grace_s: float = 30.0, side: SideChannels | None = None,
                 watch_interval_s: float = 1.0, recent_window_s: float = 300.0,
                 engine_watchdog_s: float = 120.0, max_engine_failures: int = 2) -> None:
        self.worker_id = worker_id
        self._runner = runner
        self._consumer = consumer
        self._publisher = publisher
        self._topics = topics
        self._admission = admission
        self._load = load
        self._load_interval_s = load_interval_s
        self._grace_s = shutdown_grace_s
        self._work: dict[str, _Work] = {}
        """Requests fetched and not yet finished, by request_id. Admitted work stays here until its task
        ends, whatever happens to its partition, so a re-delivered copy joins it instead of running twice."""
        self._held: dict[str, _Work] = {}
        """Work holding a live lease (or, Redis being unreachable, meaning to take one), by request_id: all
        renewed until the result is on the log."""
        self._done_pending: dict[str, str] = {}
        """Leases (request_id → value) whose result is on the log but which Redis could not yet mark done:
        retried by the renewal loop, so a finished request's lease never silently lapses."""
        self._recent: OrderedDict[str, float] = OrderedDict()
        """Requests whose result this worker put on the log, and when: a copy re-delivered meanwhile is
        skipped (the result is durable; the store may just not have recorded it yet)."""
        self._recent_window_s = recent_window_s
        self._watchdog_s = engine_watchdog_s
        self._max_engine_failures = max_engine_failures
        self._facts_pending: asyncio.Future[dict[str, DispatchFacts]] | None = None
        self._quarantine: str | None = None
        """A suspect (a request that was in an engine failure) that has claimed the engine: it runs alone,
        so a second failure is its own and no bystander collects a strike beside it."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._generations: set[asyncio.Task[None]] = set()
        self._watchers: set[asyncio.Task[None]] = set()
        self._progress = asyncio.Event()
        self._side = side or SideChannels()
        self._watch_interval_s = watch_interval_s
        self._deltas: list[tuple[str, dict[str, str]]] = []
        """Token deltas and end markers waiting for the next flush to Redis, in order."""
        self._deltas_waiting = asyncio.Event()
        """Set when ``_deltas`` gains an entry: the flusher sends as soon as the previous flush is done."""
        self._deltas_closing = False
        """Set on the way out: the flusher sends what waits, then ends."""
        self.takeovers = 0
        """Requests taken over after another worker's lease expired."""
        self.revoked_in_preflight = 0
        """Admitted work (preflight or recording its attempt) whose partition was revoked, cumulative: the
        window in which a forgetful worker used to generate a request twice."""

    # -- the loop ------------------------------------------------------------------------------------------

    async def start(self) -> None:
        await self._publisher.start()
        await self._consumer.start()

    async def close(self) -> None:
        await self._consumer.stop()
        await self._publisher.stop()

    async def run(self, stop: asyncio.Event) -> None:
        renewing = asyncio.create_task(self._renew_leases_forever())
        flusher = asyncio.create_task(self._flush_deltas_forever())
        background = [renewing] + [asyncio.create_task(c) for c in (
            self._report_load_forever(), self._watch_engine_forever())]
        try:
            while not stop.is_set() and self._runner.failure is None:
                wanted = [p for p in Priority if self._admission.wants(p)]
                if wanted:  # interactive records are still fetched while batch work waits for room
                    self._consumer.resume_only({self._topics.tokenized(p) for p in wanted})
                    fetched = await self._consumer.fetch(max(self._admission.room(p) for p in wanted))
                    suspects = await self._suspects_among(fetched)
                    for record in fetched:
                        await self._triage(record, suspects)
                else:
                    self._consumer.pause_all()  # keep polling (heartbeats, rebalances) but fetch nothing
                    await self._consumer.fetch(1, timeout_ms=0)
                    await self._wait_progress(0.05)
                self._start_admitted()
                await self._consumer.commit()
            if self._runner.failure is not None:
                await self._abandon_all(renewing)
            else:
                await self._drain(renewing)
        finally:
            for task in background:
                task.cancel()
            # The flusher sends what waits and ends, never cut off mid-flush: a stream reader must see every
            # delta before its end marker. Bounded: a hung Redis costs the streams, never the shutdown.
            self._deltas_closing = True
            self._deltas_waiting.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(flusher, DELTA_DRAIN_S)
            if self._load is not None:
                await self._load.remove(self.worker_id)

    async def _drain(self, renewing: asyncio.Task[None]) -> None:
        """Stop admitting; let what runs finish within the grace period; commit what finished. Work cut
        off past the grace period is stopped in the engine, its lease released and its offsets left
        uncommitted for another worker."""
        self._consumer.pause_all()
        for watcher in list(self._watchers):  # another worker's work: nothing to wait for
            watcher.cancel()
        if self._generations:
            log.info("draining %d tasks (grace %.0fs)", len(self._generations), self._grace_s)
        # A batch in preflight starts its generations when it is answered: wait for those too (a lease given up
        # under a running generation lets another worker generate it again).
        deadline = self._clock() + self._grace_s
        while (running := [t for t in self._generations if not t.done()]) and self._clock() < deadline:
            await asyncio.wait(running, timeout=deadline - self._clock())
        for _round in range(3):  # past the grace period: cancel, and cancel what a cancelled batch started
            pending = [t for t in self._generations if not t.done()]
            if not pending:
                break
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=5)
        renewing.cancel()
        await self._best_effort(self._give_up_leases())
        await self._consumer.commit()

    async def _give_up_leases(self) -> None:
        """On the way out: release the leases of attempts of which nothing reached the results log, so others
        take them over at once; one cut off mid-publish keeps its lease until it expires (its result may
        still land: never mark done what may not be there); mark done what is owed."""
        leases = self._side.leases
        held = {rid: w.lease for rid, w in self._held.items()
                if w.state in ("admitted", "running") and w.lease is not None}
        self._held.clear()
        if leases is not None:
            await leases.release_many(held)
            await self._mark_pending_done(leases)

    async def _abandon_all(self, renewing: asyncio.Task[None]) -> None:
        """The engine failed: publish nothing terminal for the work it held (none of it is the requests'
        fault), record a strike against each request that was in the engine, release the leases so other
        workers take the work over at once, and commit only what had finished. Bounded in time (the process
        also has a hard exit armed when the engine failed); the caller then exits non-zero."""
        self._consumer.pause_all()
        renewing.cancel()
        for task in self._watchers:
            task.cancel()
        try:
            async with asyncio.timeout(3.0):
                # Results already being published are not the engine's: give them a moment to land (the
                # attempts the engine held have ended with EngineFailed already).
                unfinished = [t for t in self._generations if not t.done()]
                if unfinished:
                    await asyncio.wait(unfinished, timeout=1.0)
                for task in self._generations:
                    task.cancel()
                struck = sorted(self._runner.abandoned)
                log.error("engine failed (%s): %d requests were in it, %d tracked", self._runner.failure,
                          len(struck), len(self._work))
                if struck and self._side.ledger is not None:
                    await self._side.ledger.record_engine_failure(struck)
                await self._give_up_leases()
        except Exception as exc:  # noqa: BLE001 - best effort on the way out: leases expire, strikes are lost
            log.warning("engine failure clean-up incomplete: %r", exc)
        self._held.clear()
        await self._consumer.commit()

    async def _watch_engine_forever(self) -> None:
        """The watchdog: requests in the engine and no engine step completed for ``engine_watchdog_s``
        means the engine hangs; it is failed like a crashed one."""
        last_steps, last_change = self._runner.steps(), self._clock()
        while self._runner.failure is None:
            await asyncio.sleep(min(1.0, self._watchdog_s / 4))
            steps, busy = self._runner.steps(), len(self._runner.running_ids())
            stopped = self._runner.stopped_reason() if busy else None
            if stopped is not None:  # crashed without failing its requests (their outputs never came)
                self._runner.fail(stopped)
            elif steps != last_steps or not busy:
                last_steps, last_change = steps, self._clock()
            elif self._clock() - last_change > self._watchdog_s:
                self._runner.fail(f"no engine step completed in {self._watchdog_s:.0f}s with {busy} requests "
                                  "in the engine")
        self._progress.set()

    @staticmethod
    def _clock() -> float:
        """The event loop's clock (monotonic): every timer here runs on it, so a test's fake loop time moves
        them all together."""
        return asyncio.get_running_loop().time()

    async def _wait_progress(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._progress.wait(), timeout)
        except TimeoutError:
            pass
        self._progress.clear()

    # -- triage: what to do with a fetched record ----------------------------------------------------------

    async def _suspects_among(self, fetched: list[FetchedRecord]) -> set[str]:
        """The fetched requests that were in an engine failure, in one read for the batch, so the quarantine
        knows them before other work fills the engine. Best effort: preflight reads it again anyway."""
        keys = sorted({r.key.decode("utf-8", "replace") for r in fetched if r.key})
        if not keys or self._side.ledger is None or self._facts_pending is not None:
            return set()
        # Bounded without cancelling: this runs on the fetch loop, which must never wait on a stalled store
        # (and cancelling an asyncpg query waits on the server too). One lookup at most is outstanding.
        lookup = asyncio.ensure_future(self._side.ledger.dispatch_facts(keys))
        self._facts_pending = lookup
        lookup.add_done_callback(self._facts_settled)
        done, _pending = await asyncio.wait({lookup}, timeout=1.0)
        if not done or lookup.cancelled() or lookup.exception() is not None:
            return set()
        facts = lookup.result()
        return {key for key, fact in facts.items() if fact.terminal is None and self._is_suspect(fact.engine_failures)}

    def _is_suspect(self, engine_failures: int) -> bool:
        """One more engine failure would end it: it runs alone, so it is only ever failed for a failure it
        was proven to cause (it was alone in the engine)."""
        return engine_failures > 0 and engine_failures >= self._max_engine_failures - 1

    def _facts_settled(self, lookup: asyncio.Future[dict[str, DispatchFacts]]) -> None:
        self._facts_pending = None
        if not lookup.cancelled() and lookup.exception() is not None:
            log.debug("suspect lookup failed: %r", lookup.exception())

    async def _triage(self, raw: FetchedRecord, suspects: set[str] | None = None) -> None:
        tp: Position = (raw.topic, raw.partition)
        try:
            record = TokenizedRecord.model_validate_json(raw.value or b"")
        except ValidationError as exc:
            request_id = raw.key.decode("utf-8", "replace") if raw.key else None
            reason = f"invalid tokenized record: {exc.errors()[0].get('msg')}"
            outgoing: list[Outgoing] = [(self._topics.dlq, request_id, dead_letter(
                "gpu-worker", reason, topic=raw.topic, partition=raw.partition, offset=raw.offset,
                request_id=request_id, value=raw.value))]
            try:  # a failed result too, if the record's key is one a result can carry (no NUL, bounded)
                if request_id:
                    outgoing.append((self._topics.results, request_id, ended(
                        request_id, Status.FAILED, message=reason, code="invalid_record", worker_id=self.worker_id)))
            except ValidationError:
                pass
            self._spawn(self._hand_on(outgoing, [(tp, raw.offset)]))
            return
        existing = self._work.get(record.request_id)
        if existing is not None:  # delivered again while this worker has it: finish both together
            existing.positions.append((tp, raw.offset))
            return
        if self._finished_recently(record.request_id):  # its result is on the log already
            self._consumer.finish(tp, raw.offset)
            self._progress.set()
            return
        work = _Work(record, [(tp, raw.offset)], suspect=record.request_id in (suspects or ()))
        refusal = self._refusal(record)
        if refusal is not None:
            self._spawn(self._hand_on([(self._topics.results, record.request_id, refusal)], work.positions,
                                      finished=record.request_id))
            return
        self._work[record.request_id] = work
        self._offer(work)

    def _offer(self, work: _Work) -> None:
        """Queue work for admission, reserving its worst case of KV (prompt + max_tokens)."""
        record = work.record
        self._admission.offer(record.request_id, len(record.input_ids) + record.params.max_tokens,
                              record.priority, work)

    def _refusal(self, record: TokenizedRecord) -> ResultRecord | None:
        """A terminal result for a request this worker must not run, else None."""
        at = now()
        if record.deadline_at is not None and record.deadline_at <= at:
            return self._terminal(record, Status.EXPIRED, "The request's deadline passed before it was admitted.",
                                  "deadline_exceeded")
        if record.model != self._runner.model.name:
            return self._terminal(record, Status.FAILED, f"This worker serves {self._runner.model.name!r}, not "
                                  f"{record.model!r}.", "model_not_served")
        vocab = self._runner.vocab_size
        if vocab and any(not 0 <= token < vocab for token in record.input_ids):
            return self._terminal(record, Status.FAILED, f"The record's input_ids fall outside the model's "
                                  f"vocabulary of {vocab} tokens.", "invalid_token_ids")
        context = self._runner.context_length
        if context and len(record.input_ids) + record.params.max_tokens > context:
            return self._terminal(record, Status.FAILED, f"The prompt ({len(record.input_ids)} tokens) plus "
                                  f"max_tokens ({record.params.max_tokens}) exceeds the model's context of "
                                  f"{context} tokens.", "context_length_exceeded")
        if not self._admission.fits_ever(len(record.input_ids) + record.params.max_tokens):
            return self._terminal(record, Status.FAILED, "The prompt plus max_tokens exceeds this worker's KV "
                                  f"cache of {self._admission.capacity.kv_tokens} tokens; lower max_tokens.",
                                  "kv_capacity_exceeded")
        return None

    def _terminal(self, record: TokenizedRecord, status: Status, message: str, code: str) -> ResultRecord:
        return ended(record.request_id, status, message=message, code=code, model=record.model,
                     tenant=record.tenant, worker_id=self.worker_id, timings=record.timings)

    # -- generation ----------------------------------------------------------------------------------------

    def _start_admitted(self) -> None:
        if self._runner.failure is not None:
            return
        holder = self._quarantine
        if holder is not None or any(w.suspect and w.state == "waiting" for w in self._work.values()):
            # Quarantine: one suspect at a time, admitted only once the engine is empty, and nothing else
            # admitted meanwhile (the others keep their places in the queue: no polling).
            if any(w.state in ("admitted", "running", "publishing") for w in self._work.values()):
                return
            suspect = self._admission.admit_first_matching(
                lambda w: w.record.request_id == holder if holder is not None else w.suspect)
            admitted = [suspect] if suspect is not None else []
        else:
            admitted = self._admission.admit_ready()
        for work in admitted:
            work.state = "admitted"  # from here on a revocation no longer drops it
        if admitted:
            self._spawn(self._dispatch(admitted), self._generations)

    async def _dispatch(self, batch: list[_Work]) -> None:
        """Preflight an admitted batch in one round trip per store (terminal check and strikes, cancel flags,
        leases), then start each request the verdict lets run and settle the others."""
        try:
            verdicts = await self._preflight(batch)
        except asyncio.CancelledError:
            for work in batch:
                self._admission.release(work.record.request_id)
                self._drop(work)
            raise
        except Exception as exc:  # noqa: BLE001 - unknown is not "absent": never run on a failed read
            if len(batch) > 1 and not isinstance(exc, StoreUnavailable | SideChannelUnavailable):
                # Not an outage: maybe one request the store cannot take. Preflight each alone, so one such
                # request holds back nobody else (it alone goes on retrying).
                log.warning("preflight of a batch of %d failed (%r): each alone", len(batch), exc)
                for work in batch:
                    self._spawn(self._dispatch([work]), self._generations)
                return
            for work in batch:
                self._admission.release(work.record.request_id)
                self._retry_later(work, exc)
            return
        if self._runner.failure is not None:  # the engine failed meanwhile: record no attempt it cannot run
            for work in batch:
                self._admission.release(work.record.request_id)
            self._progress.set()
            return
        assert len(verdicts) == len(batch), "one verdict (and one lease) per request of a batch"
        for work in batch:
            self._spawn(self._generate(work, verdicts[work.record.request_id]), self._generations)

    async def _generate(self, work: _Work, verdict: Verdict) -> None:
        record = work.record
        request_id = record.request_id
        if verdict == "defer":  # the engine is reserved for a suspect running alone, or busy for one
            self._admission.release(request_id)
            self._offer_again(work, 0.2)
            return
        if verdict != "run":
            self._admission.release(request_id)
            if isinstance(verdict, list):
                await self._hand_on(verdict, [], finished=request_id)
                self._finish(work)  # every copy joined while it published, too
            elif verdict == "watch":
                self._watch_or_drop(work)
            else:
                self._finish(work)
            return
        admitted_at = now()
        params = record.params
        attempt = EventRecord(request_id=request_id, status=Status.RUNNING, stage="gpu-worker",
                              worker_id=self.worker_id, timings=record.timings.merged(admitted_at=admitted_at))
        timer: asyncio.TimerHandle | None = None
        done: GenerationDone | None = None
        try:
            # The attempt is on the log (acknowledged) before the model sees the request (contract 4).
            await self._publish([(self._topics.events, request_id, attempt)])
            if not (work.lost or work.cancelled):
                work.chunk_ends = []  # this attempt's chunks are numbered from 1
                future = self._runner.submit(GenerationJob(
                    request_id=request_id, input_ids=record.input_ids, max_tokens=params.max_tokens,
                    temperature=params.temperature, top_p=params.top_p, stop=tuple(params.stop),
                    ignore_eos=params.ignore_eos), on_text=self._on_text if self._side.deltas else None)
                work.state = "running"
                if record.deadline_at is not None:
                    timer = asyncio.get_running_loop().call_later(
                        max(0.0, record.deadline_at - now()), self._runner.cancel, request_id, "expired")
                try:
                    done = await future
                except asyncio.CancelledError:  # drained past the grace period: stop it in the engine too
                    self._runner.cancel(request_id, "cancelled")
                    raise
        except asyncio.CancelledError:
            raise
        except EngineFailed:  # the engine's fault, not the request's: publish nothing; the worker exits
            self._progress.set()
            return
        except Exception as exc:  # noqa: BLE001 - broke before any result: give the attempt up, retry
            await self._abandon(work)
            self._retry_later(work, exc)
            return
        finally:
            self._admission.release(request_id)
            if timer is not None:
                timer.cancel()
        if work.lost:  # another worker holds the lease now: its attempt publishes; this one publishes nothing
            log.warning("lease of %s lost mid-attempt: publishing nothing for it", request_id)
            self._watch_or_drop(work)
            return
        result = self._result(record, done, admitted_at, work) if done is not None else self._cancelled(record)
        work.state = "publishing"
        await self._publish([(self._topics.results, request_id, result)])
        value = work.lease
        self._remember_finished(request_id)  # from here a re-delivered copy is skipped...
        self._finish(work)  # ...and every copy joined so far (read after the publish) is finished
        self._deltas.append((request_id, {"end": result.status.value, "finish_reason": result.finish_reason or "",
                                          "completion_tokens": str(result.usage.completion_tokens),
                                          "a": value or ""}))
        self._deltas_waiting.set()
        await self._lease_done(request_id, value)

    async def _lease_done(self, request_id: str, value: str | None) -> None:
        """The result is on the log: the lease says so until the store has recorded it, so no watcher takes
        over finished work however far the store lags. If Redis cannot be told now, the renewal loop keeps
        trying; should the live lease lapse first (a Redis outage longer than its TTL), a watcher may take
        the request over before the store has it (Redis is AP: the first terminal result wins)."""
        if value is None or self._side.leases is None:
            return
        try:
            await self._side.leases.mark_done(request_id, value)
        except SideChannelUnavailable as exc:
            log.warning("lease of %s not yet marked done (%s): retrying", request_id, exc)
            self._done_pending[request_id] = value

    async def _abandon(self, work: _Work) -> None:
        """Give up this attempt's lease: nothing of it reached the results log."""
        self._unhold(work, leave_quarantine=False)  # the caller decides about the quarantine
        if work.lease is not None and self._side.leases is not None:
            await self._best_effort(self._side.leases.release(work.record.request_id, work.lease))
        work.lease = None

    def _retry_later(self, work: _Work, reason: BaseException) -> None:
        """Preflight could not decide (the terminal check or the lease store failed in an unknown way), or
        the attempt broke before the engine took it: offer the work again after a backoff. It keeps its
        offsets (uncommitted) meanwhile; a revocation drops it like any waiting work."""
        request_id = work.record.request_id
        self._unhold(work)
        work.state, work.lease, work.lost = "waiting", None, False
        work.retries += 1
        delay = min(30.0, 0.5 * 2 ** min(work.retries, 6))
        log.warning("%s not started (%r): offered again in %.1fs", request_id, reason, delay)
        self._spawn(self._offer_later(work, delay))

    def _offer_again(self, work: _Work, delay: float) -> None:
        """Not now, but soon (no backoff): back to waiting, offered again after ``delay``. A suspect keeps
        its claim on the quarantine."""
        self._unhold(work, leave_quarantine=False)
        work.state, work.lease = "waiting", None
        self._spawn(self._offer_later(work, delay))

    async def _offer_later(self, work: _Work, delay: float) -> None:
        await asyncio.sleep(delay)
        request_id = work.record.request_id
        if self._work.get(request_id) is not work or work.state != "waiting":
            return
        if not work.positions:  # its partitions were revoked while it was admitted: the new owner has it
            self._drop(work)
            return
        self._offer(work)
        self._progress.set()

    def _unhold(self, work: _Work, *, leave_quarantine: bool = True) -> None:
        """This work no longer holds (or means to take) a lease, nor, unless told, the quarantine."""
        request_id = work.record.request_id
        if self._held.get(request_id) is work:
            del self._held[request_id]
        if leave_quarantine and self._quarantine == request_id:
            self._quarantine = None

    def _drop(self, work: _Work) -> None:
        """Stop tracking this work (its task has ended)."""
        self._unhold(work)
        if self._work.get(work.record.request_id) is work:
            del self._work[work.record.request_id]

    def _watch_or_drop(self, work: _Work) -> None:
        """Watch another worker's attempt while this worker still has copies of the record to commit."""
        request_id = work.record.request_id
        self._unhold(work)
        work.lease, work.lost = None, False  # a cancel it got stays: a takeover ends it cancelled
        if work.positions and self._work.get(request_id) is work:
            work.state = "watching"
            self._spawn(self._watch(work), self._watchers)
        else:
            self._drop(work)

    def _finished_recently(self, request_id: str) -> bool:
        horizon = self._clock() - self._recent_window_s
        while self._recent and next(iter(self._recent.values())) < horizon:
            self._recent.popitem(last=False)
        return request_id in self._recent

    def _remember_finished(self, request_id: str) -> None:
        self._recent[request_id] = self._clock()
        self._recent.move_to_end(request_id)
        while len(self._recent) > 100_000:
            self._recent.popitem(last=False)

    async def _preflight(self, batch: list[_Work]) -> dict[str, Verdict]:
        """Per request of the batch: ``run``; ``done`` (a terminal result is stored: skip it); ``watch``
        (another attempt's lease, live or done, holds it); ``defer`` (the engine is kept for a suspect); or
        the records to publish instead of running it (cancelled before it ran; failed after too many engine
        failures). One read of the ledger, one of the cancel flags, one lease round trip, for the batch."""
        side = self._side
        verdicts: dict[str, Verdict] = {}
        if side.ledger is not None:  # (a StoreUnavailable is "unknown": the caller retries later, never runs)
            facts = await side.ledger.dispatch_facts([w.record.request_id for w in batch])
            for work in batch:
                fact = facts.get(work.record.request_id, DispatchFacts(None))
                if fact.terminal is not None:
                    verdicts[work.record.request_id] = "done"
                elif fact.engine_failures >= self._max_engine_failures:
                    verdicts[work.record.request_id] = self._engine_error(work, fact.engine_failures)
                else:
                    work.cancelled = work.cancelled or fact.cancelled
                    work.suspect = work.suspect or self._is_suspect(fact.engine_failures)
            for work in sorted(batch, key=lambda w: w.suspect):  # the others defer to a suspect among them
                if work.record.request_id not in verdicts and not self._may_enter_engine(work):
                    verdicts[work.record.request_id] = "defer"
        open_ids = [w.record.request_id for w in batch if w.record.request_id not in verdicts]
        flagged = await self._best_effort(side.cancels.flagged(open_ids)) if side.cancels and open_ids else None
        for work in batch:
            request_id = work.record.request_id
            if request_id not in verdicts and (work.cancelled or request_id in (flagged or ())):
                verdicts[request_id] = [(self._topics.results, request_id, self._cancelled(work.record))]
        if side.leases is not None:
            wanted = {w.record.request_id: side.leases.new_value() for w in batch
                      if w.record.request_id not in verdicts}
            try:
                taken = await side.leases.acquire_many(wanted)
            except SideChannelUnavailable as exc:
                # Redis down (AP): run on the terminal check alone; the renewal loop takes the leases as soon
                # as Redis answers, and an attempt whose lease another worker took meanwhile is abandoned.
                log.warning("%d leases not taken (%s): running on the terminal check alone", len(wanted), exc)
                taken = set(wanted)
            for work in batch:
                request_id = work.record.request_id
                if request_id not in wanted:
                    continue
                if request_id not in taken:
                    log.info("watching %s: another attempt's lease holds it", request_id)
                    verdicts[request_id] = "watch"
                    continue
                work.lease = wanted[request_id]
                self._held[request_id] = work
        for work in batch:
            verdicts.setdefault(work.record.request_id, "run")
        return verdicts

    async def _watch(self, work: _Work) -> None:
        """Another attempt holds the lease: keep the offsets uncommitted until the request is terminal, or
        take it over once the lease is free (its holder stopped renewing). A done lease (the result is on
        the log, the store has not recorded it yet) is watched like a live one. A read error is never an
        expiry: it only means "ask again"."""
        request_id = work.record.request_id
        side = self._side
        assert side.leases is not None
        while self._work.get(request_id) is work and work.state == "watching":
            await asyncio.sleep(self._watch_interval_s)
            try:
                if side.ledger is not None and request_id in await side.ledger.terminal_statuses([request_id]):
                    self._finish(work)
                    return
                state, _holder = await side.leases.state_of(request_id)
            except Exception as exc:  # noqa: BLE001 - unknown is not "expired": ask again next time
                log.warning("watch of %s could not read (%r): still watching", request_id, exc)
                continue
            if state is LeaseState.FREE and self._work.get(request_id) is work:
                log.info("taking over %s: its lease expired", request_id)
                self.takeovers += 1
                work.state = "waiting"
                self._offer(work)
                self._progress.set()
                return

    def _may_enter_engine(self, work: _Work) -> bool:
        """Quarantine: a suspect claims the engine, waits until nothing else runs, and runs alone; nothing
        else starts while a suspect waits or runs, so suspects run back to back."""
        request_id = work.record.request_id
        if not work.suspect:
            return self._quarantine is None and not any(
                w.suspect and w.state in ("waiting", "admitted") for w in self._work.values())
        if self._quarantine is None:
            self._quarantine = request_id
            log.warning("%s was in an engine failure: it runs alone", request_id)
        # Alone: nothing else in the engine, nor on its way there (admitted work that passed this check
        # before the quarantine was claimed).
        return self._quarantine == request_id and not any(
            w.state in ("admitted", "running", "publishing") and w.record.request_id != request_id
            for w in self._work.values())

    def _engine_error(self, work: _Work, failures: int) -> list[Outgoing]:
        """A request that was in the engine each time it failed: end it, so it cannot crash-loop the fleet."""
        record = work.record
        message = (f"The generation engine failed {failures} times while running this request; it is not "
                   "attempted again. Retry it with another request_id if it should run.")
        result = ended(record.request_id, Status.FAILED, message=message, code="engine_error",
                       error_type="server_error", model=record.model, tenant=record.tenant,
                       worker_id=self.worker_id, finish_reason="error", timings=record.timings)
        (topic, partition), offset = work.positions[0] if work.positions else (("", -1), -1)
        dead = dead_letter("gpu-worker", f"engine_error: {message}", topic=topic, partition=partition,
                           offset=offset, request_id=record.request_id, value=record.model_dump_json())
        return [(self._topics.results, record.request_id, result), (self._topics.dlq, record.request_id, dead)]

    def _finish(self, work: _Work) -> None:
        """Nothing to publish (already terminal): let the commit pass this request's offsets."""
        for tp, offset in work.positions:
            self._consumer.finish(tp, offset)
        self._drop(work)
        self._progress.set()

    def _cancelled(self, record: TokenizedRecord) -> ResultRecord:
        return ended(record.request_id, Status.CANCELLED, model=record.model, tenant=record.tenant,
                     worker_id=self.worker_id, finish_reason="cancelled", text="", timings=record.timings)

    def cancel(self, request_id: str) -> None:
        """A cancel arrived: stop it if it runs here (its result says ``cancelled``), drop it if it waits
        for admission (it ends ``cancelled`` at once), else mark it: work in preflight, recording its
        attempt or between two offers ends ``cancelled`` before the engine sees it."""
        if self._runner.cancel(request_id, "cancelled"):
            return
        work = self._work.get(request_id)
        if work is None:
            return
        if work.state == "waiting" and self._admission.discard_waiting(request_id):
            self._drop(work)
            self._spawn(self._hand_on([(self._topics.results, request_id, self._cancelled(work.record))],
                                      work.positions, finished=request_id))
        elif work.state != "publishing":
            work.cancelled = True

    def _on_text(self, request_id: str, delta: str) -> None:
        """A chunk of text to stream: numbered (``n``, from 1 in each attempt) and tagged with the attempt
        (``a``, its lease value), so a reader resumes after chunk N and never mixes two attempts' chunks."""
        work = self._work.get(request_id)
        if work is None:
            return
        ends = work.chunk_ends
        ends.append((ends[-1] if ends else 0) + len(delta))
        self._deltas.append((request_id, {"d": delta, "n": str(len(ends)), "a": work.lease or ""}))
        self._deltas_waiting.set()

    async def _best_effort(self, call):  # type: ignore[no-untyped-def]
        """Await a Redis side-channel call; on failure log it and return None (Redis is AP)."""
        if call is None:
            return None
        try:
            return await call
        except SideChannelUnavailable as exc:
            log.warning("redis side channel unavailable: %s", exc)
            return None

    def _result(self, record: TokenizedRecord, done: GenerationDone, admitted_at: float, work: _Work) -> ResultRecord:
        timings = record.timings.merged(admitted_at=admitted_at, first_token_at=done.first_token_at,
                                        completed_at=done.completed_at)
        result = ResultRecord(
            request_id=record.request_id, status=Status.COMPLETED, model=record.model,
            model_version=self._runner.version, tenant=record.tenant, worker_id=self.worker_id, timings=timings,
            usage=Usage(prompt_tokens=len(record.input_ids), completion_tokens=len(done.token_ids)),
            finish_reason=done.finish_reason, text=done.text, chunks=_chunks(work.chunk_ends, done.text),
            attempt=work.lease if work.chunk_ends else None)
        status = FINISH_STATUS[done.finish_reason]
        if done.finish_reason == "error":
            return result.model_copy(update={"status": status, "text": None, "error": ErrorInfo(
                message=f"generation failed: {done.error}", type="server_error", code="generation_failed")})
        if done.finish_reason == "expired":
            return result.model_copy(update={"status": status, "error": ErrorInfo(
                message="The request's deadline passed while it was generating.", code="deadline_exceeded")})
        return result.model_copy(update={"status": status})

    async def _hand_on(self, outgoing: list[Outgoing], positions: list[tuple[Position, int]],
                       finished: str | None = None) -> None:
        """Publish, and once acknowledged mark the records finished so the commit can pass them.
        ``finished``: the request whose terminal result this is (a copy re-delivered later is skipped)."""
        await self._publish(outgoing)
        if finished is not None:
            self._remember_finished(finished)
        for tp, offset in positions:
            self._consumer.finish(tp, offset)
        self._progress.set()

    async def _publish(self, outgoing: list[Outgoing]) -> None:
        """Publish until acknowledged (the publisher waits a broker outage out; the offsets wait with it)."""
        await self._publisher(outgoing)

    def _spawn(self, coro, group: set[asyncio.Task[None]] | None = None) -> None:  # type: ignore[no-untyped-def]
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        if group is not None:
            group.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._generations.discard(task)
        self._watchers.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("worker task failed", exc_info=task.exception())

    def drop_revoked(self, revoked: set[Position]) -> None:
        """Partitions were revoked: work from them that has not started here (waiting for KV room, or
        watching another worker's lease) is no longer ours; the new owner re-reads it. Admitted work (in
        preflight, recording its attempt, generating, publishing) stays tracked until its task ends, so a
        copy re-delivered here joins it; its offsets are the new owner's to commit."""
        for work in list(self._work.values()):
            if work.state == "admitted" and any(tp in revoked for tp, _off in work.positions):
                self.revoked_in_preflight += 1
            work.positions = [(tp, off) for tp, off in work.positions if tp not in revoked]
            if work.positions or work.state not in ("waiting", "watching"):
                continue
            if work.state == "waiting":
                self._admission.discard_waiting(work.record.request_id)
            self._drop(work)  # a watcher sees this and stops

    # -- side channels -------------------------------------------------------------------------------------

    async def _flush_deltas(self) -> bool:
        """Send every waiting delta in one pipelined call; False when Redis did not take them (they are
        dropped: a stream reader falls back to the stored result)."""
        if not self._deltas or self._side.deltas is None:
            self._deltas.clear()
            return True
        batch, self._deltas = self._deltas, []
        try:
            await self._side.deltas.append_many(batch)
        except SideChannelUnavailable as exc:
            log.warning("token deltas not streamed (%d dropped): %s", len(batch), exc)
            return False
        return True

    async def _flush_deltas_forever(self, min_interval_s: float = 0.005, max_backoff_s: float = 1.0) -> None:
        """Deltas go out as soon as they come: one pipelined call per flush, and what arrives while a flush
        is in flight (every request's token of the next step) goes out together in the next. A fixed 50 ms
        tick used to add up to 50 ms to every stream's first token. While Redis refuses, the pause between
        flushes doubles up to ``max_backoff_s``. Ends once closing and nothing waits."""
        pause = min_interval_s
        while not (self._deltas_closing and not self._deltas):
            await self._deltas_waiting.wait()
            self._deltas_waiting.clear()
            try:
                sent = await self._flush_deltas()
            except Exception:  # noqa: BLE001 - the flusher must outlive any one batch
                log.exception("token delta flush failed unexpectedly")
                sent = False
            pause = min_interval_s if sent else min(max_backoff_s, max(0.05, pause * 2))
            if not self._deltas_closing:
                await asyncio.sleep(pause)

    async def _renew_leases_forever(self) -> None:
        """Renew every held lease. A renewal error is not a loss: keep generating, and re-take the lease
        when Redis answers. Only a lease another attempt holds is lost: that attempt is abandoned."""
        leases = self._side.leases
        if leases is None:
            return
        while True:
            await asyncio.sleep(leases.ttl_ms / 3000)
            await self._mark_pending_done(leases)
            held = {request_id: work.lease for request_id, work in self._held.items() if work.lease is not None}
            try:
                outcome = await leases.renew_many(held)
            except SideChannelUnavailable as exc:
                log.warning("leases not renewed (%s): still generating, will re-take them", exc)
                continue
            for request_id, verdict in outcome.items():
                if verdict == Renewal.RETAKEN:
                    log.warning("lease of %s had lapsed and was re-taken", request_id)
                elif verdict == Renewal.LOST:
                    self._lose(request_id, held[request_id])

    async def _mark_pending_done(self, leases: LeasePort) -> None:
        for request_id, value in list(self._done_pending.items()):
            try:
                await leases.mark_done(request_id, value)
            except SideChannelUnavailable:
                return
            self._done_pending.pop(request_id, None)

    def _lose(self, request_id: str, value: str) -> None:
        work = self._held.get(request_id)
        if work is None or work.lease != value:
            return
        del self._held[request_id]
        if work.state not in ("admitted", "running"):
            return  # already publishing (the first terminal result wins) or gone
        work.lost = True
        if work.state == "running":
            self._runner.cancel(request_id, "cancelled")

    # -- load ----------------------------------------------------------------------------------------------

    def snapshot(self) -> LoadSnapshot:
        stats = self._runner.stats()
        return LoadSnapshot(
            worker_id=self.worker_id, model=self._runner.model.name, model_version=self._runner.version,
            running=stats.active, admitted=self._admission.running, waiting=self._admission.waiting,
            tokens_in_flight=self._admission.tokens_in_flight, free_kv_blocks=stats.free_kv_blocks,
            total_kv_blocks=stats.total_kv_blocks,
            watching=sum(1 for w in self._work.values() if w.state == "watching"),
            in_preflight=sum(1 for w in self._work.values() if w.state == "admitted"),
            revoked_in_preflight=self.revoked_in_preflight, takeovers=self.takeovers,
            partitions=sorted(f"{topic}:{partition}" for topic, partition in self._consumer.assignment()))

    async def _report_load_forever(self) -> None:
        if self._load is None:
            return
        while True:
            await self._load.publish(self.snapshot())
            await asyncio.sleep(self._load_interval_s)


def _chunks(ends: list[int], text: str) -> list[int] | None:
    """The streamed chunks' ends as the stored text can hold them: none past its end, and a last chunk for
    any text the stream did not carry (the runner sends the final text only if it extends what it sent)."""
    if not ends:
        return None
    kept = [end for end in ends if end <= len(text)]
    return kept if kept and kept[-1] == len(text) else [*kept, len(text)]
