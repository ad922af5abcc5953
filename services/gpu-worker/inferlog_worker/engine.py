"""GpuWorker: the worker's loop. Fetch what admission has room for, start it on the runner, publish each
result, and commit past it only once the broker has acknowledged that result.

    fetch (TierConsumer) → triage → KvAdmission → ModelRunner → results topic (acked) → finish → commit

Nothing here blocks the event loop: generation runs on the manager's thread, and the loop only moves
records, so consumer-group heartbeats keep their schedule however long a generation takes.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from aiokafka import AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from inferlog.kafka import Outgoing, publish_all
from inferlog.messages import (
    DeadLetter,
    ErrorInfo,
    EventRecord,
    ResultRecord,
    Status,
    TokenizedRecord,
    Usage,
    now,
)
from inferlog.topics import Topics
from inferlog_worker.admission import KvAdmission
from inferlog_worker.consumer import TierConsumer
from inferlog_worker.load import LoadReporter, LoadSnapshot
from inferlog_worker.runner import GenerationDone, GenerationJob, ModelRunner

log = logging.getLogger(__name__)


@dataclass
class _Work:
    record: TokenizedRecord
    positions: list[tuple[TopicPartition, int]] = field(default_factory=list)
    """Every fetched copy of this request (a re-delivery while it runs joins the running one)."""


class GpuWorker:
    def __init__(self, *, worker_id: str, runner: ModelRunner, consumer: TierConsumer,
                 producer: AIOKafkaProducer, topics: Topics, admission: KvAdmission[_Work],
                 load: LoadReporter | None = None, load_interval_s: float = 1.0,
                 shutdown_grace_s: float = 30.0) -> None:
        self.worker_id = worker_id
        self._runner = runner
        self._consumer = consumer
        self._producer = producer
        self._topics = topics
        self._admission = admission
        self._load = load
        self._load_interval_s = load_interval_s
        self._grace_s = shutdown_grace_s
        self._work: dict[str, _Work] = {}
        """Requests fetched and not yet finished, by request_id (waiting or generating)."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._progress = asyncio.Event()

    # -- the loop ------------------------------------------------------------------------------------------

    async def start(self) -> None:
        await self._producer.start()
        await self._consumer.start()

    async def close(self) -> None:
        await self._consumer.stop()
        await self._producer.stop()

    async def run(self, stop: asyncio.Event) -> None:
        reporter = asyncio.create_task(self._report_load_forever())
        try:
            while not stop.is_set():
                if self._admission.has_room():
                    self._consumer.resume_all()
                    room = self._admission.capacity.max_running - self._admission.running
                    for record in await self._consumer.fetch(room):
                        await self._triage(record)
                else:
                    self._consumer.pause_all()  # keep polling (heartbeats, rebalances) but fetch nothing
                    await self._consumer.fetch(1, timeout_ms=0)
                    await self._wait_progress(0.05)
                self._start_admitted()
                await self._consumer.commit()
            await self._drain()
        finally:
            reporter.cancel()
            if self._load is not None:
                await self._load.remove(self.worker_id)

    async def _drain(self) -> None:
        """Stop admitting; let what runs finish within the grace period; commit what finished."""
        self._consumer.pause_all()
        running = list(self._tasks)
        if running:
            log.info("draining %d generations (grace %.0fs)", len(running), self._grace_s)
            _done, pending = await asyncio.wait(running, timeout=self._grace_s)
            for task in pending:
                task.cancel()
        await self._consumer.commit()

    async def _wait_progress(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._progress.wait(), timeout)
        except TimeoutError:
            pass
        self._progress.clear()

    # -- triage: what to do with a fetched record ----------------------------------------------------------

    async def _triage(self, raw: ConsumerRecord) -> None:
        tp = TopicPartition(raw.topic, raw.partition)
        try:
            record = TokenizedRecord.model_validate_json(raw.value or b"")
        except ValidationError as exc:
            request_id = raw.key.decode("utf-8", "replace") if raw.key else None
            reason = f"invalid tokenized record: {exc.errors()[0].get('msg')}"
            outgoing: list[Outgoing] = [(self._topics.dlq, request_id, DeadLetter(
                stage="gpu-worker", error=reason, topic=raw.topic, partition=raw.partition, offset=raw.offset,
                request_id=request_id, value=(raw.value or b"").decode("utf-8", "replace")))]
            if request_id:
                outgoing.append((self._topics.results, request_id, ResultRecord(
                    request_id=request_id, status=Status.FAILED, worker_id=self.worker_id,
                    error=ErrorInfo(message=reason, code="invalid_record"))))
            self._spawn(self._hand_on(outgoing, [(tp, raw.offset)]))
            return
        existing = self._work.get(record.request_id)
        if existing is not None:  # delivered again while this worker has it: finish both together
            existing.positions.append((tp, raw.offset))
            return
        work = _Work(record, [(tp, raw.offset)])
        refusal = self._refusal(record)
        if refusal is not None:
            self._spawn(self._hand_on([(self._topics.results, record.request_id, refusal)], work.positions))
            return
        self._work[record.request_id] = work
        self._admission.offer(record.request_id, len(record.input_ids) + record.params.max_tokens,
                              record.priority, work)

    def _refusal(self, record: TokenizedRecord) -> ResultRecord | None:
        """A terminal result for a request this worker must not run, else None."""
        at = now()
        if record.deadline_at is not None and record.deadline_at <= at:
            return self._terminal(record, Status.EXPIRED, "The request's deadline passed before it was admitted.",
                                  "deadline_exceeded", at)
        if record.model != self._runner.model.name:
            return self._terminal(record, Status.FAILED, f"This worker serves {self._runner.model.name!r}, not "
                                  f"{record.model!r}.", "model_not_served", at)
        if record.params.temperature > 0 and not self._runner.sampling:
            return self._terminal(record, Status.FAILED, "This worker serves greedy decoding only "
                                  "(temperature 0).", "sampling_not_served", at)
        if not self._admission.fits_ever(len(record.input_ids) + record.params.max_tokens):
            return self._terminal(record, Status.FAILED, "The prompt plus max_tokens exceeds this worker's KV "
                                  f"cache of {self._admission.capacity.kv_tokens} tokens; lower max_tokens.",
                                  "kv_capacity_exceeded", at)
        return None

    def _terminal(self, record: TokenizedRecord, status: Status, message: str, code: str,
                  at: float) -> ResultRecord:
        return ResultRecord(
            request_id=record.request_id, status=status, model=record.model, tenant=record.tenant,
            worker_id=self.worker_id, error=ErrorInfo(message=message, code=code),
            timings=record.timings.merged(completed_at=at))

    # -- generation ----------------------------------------------------------------------------------------

    def _start_admitted(self) -> None:
        for work in self._admission.admit_ready():
            self._spawn(self._generate(work))

    async def _generate(self, work: _Work) -> None:
        record = work.record
        admitted_at = now()
        params = record.params
        future = self._runner.submit(GenerationJob(
            request_id=record.request_id, input_ids=record.input_ids, max_tokens=params.max_tokens,
            temperature=params.temperature, top_p=params.top_p, stop=tuple(params.stop),
            ignore_eos=params.ignore_eos))
        running = EventRecord(request_id=record.request_id, status=Status.RUNNING, stage="gpu-worker",
                              worker_id=self.worker_id, timings=record.timings.merged(admitted_at=admitted_at))
        try:
            await self._publish([(self._topics.events, record.request_id, running)])
            done = await future
        finally:
            self._admission.release(record.request_id)
        result = self._result(record, done, admitted_at)
        await self._hand_on([(self._topics.results, record.request_id, result)], work.positions)
        self._work.pop(record.request_id, None)

    def _result(self, record: TokenizedRecord, done: GenerationDone, admitted_at: float) -> ResultRecord:
        timings = record.timings.merged(admitted_at=admitted_at, first_token_at=done.first_token_at,
                                        completed_at=done.completed_at)
        result = ResultRecord(
            request_id=record.request_id, status=Status.COMPLETED, model=record.model,
            model_version=self._runner.version, tenant=record.tenant, worker_id=self.worker_id, timings=timings,
            usage=Usage(prompt_tokens=len(record.input_ids), completion_tokens=len(done.token_ids)),
            finish_reason=done.finish_reason, text=done.text)
        if done.finish_reason == "error":
            return result.model_copy(update={"status": Status.FAILED, "text": None, "error": ErrorInfo(
                message=f"generation failed: {done.error}", type="server_error", code="generation_failed")})
        if done.finish_reason == "cancelled":
            return result.model_copy(update={"status": Status.CANCELLED})
        return result

    async def _hand_on(self, outgoing: list[Outgoing], positions: list[tuple[TopicPartition, int]]) -> None:
        """Publish, and once acknowledged mark the records finished so the commit can pass them."""
        await self._publish(outgoing)
        for tp, offset in positions:
            self._consumer.finish(tp, offset)
        self._progress.set()

    async def _publish(self, outgoing: list[Outgoing]) -> None:
        """Publish until acknowledged; a broker outage is waited out (the offsets wait with it)."""
        delay = 0.2
        while True:
            try:
                await publish_all(self._producer, outgoing)
                return
            except (KafkaError, OSError) as exc:
                log.warning("publish failed, retrying in %.1fs: %r", delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _spawn(self, coro) -> None:  # type: ignore[no-untyped-def]
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("worker task failed", exc_info=task.exception())

    def drop_revoked(self, revoked: set[TopicPartition]) -> None:
        """Partitions were revoked: waiting work from them is no longer ours (the new owner re-reads it)."""
        for request_id, work in list(self._work.items()):
            work.positions = [(tp, off) for tp, off in work.positions if tp not in revoked]
            if not work.positions and self._admission.discard_waiting(request_id):
                del self._work[request_id]

    # -- load ----------------------------------------------------------------------------------------------

    def snapshot(self) -> LoadSnapshot:
        stats = self._runner.stats()
        return LoadSnapshot(
            worker_id=self.worker_id, model=self._runner.model.name, model_version=self._runner.version,
            running=stats.active, admitted=self._admission.running, waiting=self._admission.waiting,
            tokens_in_flight=self._admission.tokens_in_flight, free_kv_blocks=stats.free_kv_blocks,
            total_kv_blocks=stats.total_kv_blocks,
            partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in self._consumer.assignment()))

    async def _report_load_forever(self) -> None:
        if self._load is None:
            return
        while True:
            await self._load.publish(self.snapshot())
            await asyncio.sleep(self._load_interval_s)
