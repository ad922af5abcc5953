"""Putting jobs on the log, the one way every path does it: claim in the ledger, produce, mark published.

Used by the gateway (submits and its outbox relay) and by the operators' commands (``inferlog replay`` /
``redrive``, which re-publish claimed jobs from their ledger payloads without any gateway running).

Accepting a job (DESIGN.md, contract 2): claim its ID in the ledger, then put its record on the log.

A 202 means the ID is claimed in Postgres with the full payload, and either the broker acknowledged the
record or the produce failed / timed out and the row stays unpublished for the outbox relay, which
publishes it once the broker is back (the transactional-outbox pattern). Postgres unreachable is a 503:
the gateway never accepts what it cannot keep or deduplicate.
"""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from inferlog.errors import IdempotencyConflict, StoreUnavailable
from inferlog.kafka import publish_all
from inferlog.ledger import Claim, RequestLedger, key_of
from inferlog.messages import RequestRecord, ResultRecord, Status, now
from inferlog.topics import Topics

log = logging.getLogger(__name__)


class Submitter:
    def __init__(self, ledger: RequestLedger, producer: AIOKafkaProducer, topics: Topics, timeout_s: float) -> None:
        self._ledger = ledger
        self._producer = producer
        self._topics = topics
        self._timeout_s = timeout_s

    async def submit(self, record: RequestRecord, sent_hash: str | None = None) -> Claim:
        """Claim the job (``sent_hash``: what the client sent, hashed), then publish it if it is new."""
        claim = await self._ledger.claim(record, sent_hash)
        if not claim.created:
            return claim  # the same job again: nothing new to produce or generate
        try:
            queued_at = await self._publish_queued([record])
        except (KafkaError, TimeoutError, OSError) as exc:
            log.warning("produce of %s failed (%r): accepted; the outbox relay will publish it",
                        record.request_id, exc)
            return claim
        try:
            await self._ledger.mark_published(claim.request_id, queued_at)
        except StoreUnavailable as exc:  # the broker has the record: accepted, whatever the bookkeeping says
            log.warning("%s is on the log but not marked published (%s): the tokenizer marks it when it reads "
                        "it; at worst the relay produces a second copy of the same job", record.request_id, exc)
        return Claim(claim.request_id, created=True, status=Status.QUEUED)

    async def submit_now(self, record: RequestRecord) -> Claim:
        """Claim the job and publish it, raising when the broker refuses (an operator's command, which no
        outbox relay may be behind): a claim an earlier try left unpublished is published now."""
        [outcome], published = await self.claim_and_publish([record])
        if isinstance(outcome, IdempotencyConflict):
            raise outcome
        return Claim(outcome.request_id, created=outcome.created, status=Status.QUEUED) if published else outcome

    async def claim_and_publish(self, records: list[RequestRecord]) -> tuple[list[Claim | IdempotencyConflict], set[str]]:
        """``submit_now`` for a batch (``inferlog submit``): one claim round trip, one produce of every record
        still unpublished (new, or claimed by an earlier try that never published), one mark. Returns each
        record's claim as the ledger answered it (or the conflict it hit), and the job keys this call
        published. Raises when the broker refuses: the claims stay, and a re-run publishes them."""
        outcomes = await self._ledger.claim_many(records)
        due = [r for r, o in zip(records, outcomes, strict=True) if isinstance(o, Claim) and o.status is Status.RECEIVED]
        if due:
            queued_at = await self._publish_queued(due)
            await self._ledger.mark_published([key_of(r) for r in due], queued_at)
        return outcomes, {key_of(r) for r in due}

    async def _publish_queued(self, records: list[RequestRecord]) -> float:
        """Produce claimed jobs' records stamped ``queued_at`` (returned), within the produce timeout."""
        queued_at = now()
        queued = [r.model_copy(update={"timings": r.timings.merged(queued_at=queued_at)}) for r in records]
        await asyncio.wait_for(self.publish(queued), self._timeout_s + len(queued) * 0.01)
        return queued_at

    async def publish_results(self, results: list[ResultRecord]) -> None:
        """Terminal results an operator's command decided (a job nothing is left to run from)."""
        await asyncio.wait_for(publish_all(self._producer, [(self._topics.results, r.request_id, r) for r in results]),
                               self._timeout_s + len(results) * 0.01)

    async def publish(self, records: list[RequestRecord]) -> None:
        """Each record under its job key (the records themselves carry the client's ID and tenant)."""
        await publish_all(self._producer, [(self._topics.requests, key_of(r), r) for r in records])

    async def republish(self, records: list[RequestRecord], *, chunk: int = 500, epoch: str | None = None) -> int:
        """Put already-claimed jobs back on the log (an operator's replay or re-drive): produce each chunk,
        then mark it published in the ledger. Raises on the first chunk the broker or the ledger refuses;
        the chunks before it are done (a re-run re-publishes the rest, and a job on the log twice is one
        job: claims, terminal checks and leases dedupe). Returns how many were re-published."""
        done = 0
        for start in range(0, len(records), chunk):
            part = records[start:start + chunk]
            at = now()
            part = [r if r.timings.queued_at is not None else r.model_copy(
                update={"timings": r.timings.merged(queued_at=at)}) for r in part]
            await asyncio.wait_for(self.publish(part), self._timeout_s + len(part) * 0.01)
            await self._ledger.mark_republished(part, at, epoch=epoch)
            done += len(part)
        return done


class OutboxRelay:
    """Publishes claims the broker never acknowledged, every ``interval_s``, once they are ``grace_s`` old
    (younger ones may still be in their submit's own produce)."""

    def __init__(self, ledger: RequestLedger, submitter: Submitter, *, interval_s: float, grace_s: float,
                 timeout_s: float) -> None:
        self._ledger = ledger
        self._submitter = submitter
        self._interval_s = interval_s
        self._grace_s = grace_s
        self._timeout_s = timeout_s
        self.healthy = True
        """False while the last step failed (the broker or Postgres is down)."""

    async def run(self) -> None:
        while True:
            try:
                relayed = await self.step()
                self.healthy = True
                if relayed:
                    log.info("outbox relay published %d accepted requests", relayed)
                    continue  # there may be more
            except (KafkaError, TimeoutError, OSError, StoreUnavailable) as exc:
                self.healthy = False
                log.warning("outbox relay step failed: %r", exc)
            except Exception:  # noqa: BLE001 - supervised: never die silently; /readyz shows it unhealthy
                self.healthy = False
                log.exception("outbox relay step failed unexpectedly; retrying")
                await asyncio.sleep(min(30.0, self._interval_s * 10))
            await asyncio.sleep(self._interval_s)

    async def step(self) -> int:
        async def publish(records: list[RequestRecord]) -> None:
            await asyncio.wait_for(self._submitter.publish(records), self._timeout_s)

        return await self._ledger.relay_unpublished(publish, older_than_s=self._grace_s)
