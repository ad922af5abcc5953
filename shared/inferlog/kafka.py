"""Kafka wiring: producers and consumers configured the one way inferlog uses them.

- No idempotent producer or transactions (the broker here rejects ``InitProducerId``); exactly-once effects
  come from idempotent sinks keyed by request_id.
- ``acks="all"``: a produce returns only once the record is durable on the broker.
- Consumers never auto-commit (each service commits after it has handed its work on) and wait at most
  ``fetch_max_wait_ms`` (default 10 ms; aiokafka's 500 ms costs ~134 ms a hop on this broker).
- No client ever creates a topic by asking for it. aiokafka's metadata requests say
  ``allow_auto_topic_creation=True`` and it has no setting for it; after a restart that lost its log, Tansu
  re-created a 6-partition topic with its default of 4 within 0.6 s of a consumer's metadata refresh, and the
  consumer went on, its positions silently reset. Importing this module makes every aiokafka client in the
  process ask with ``False`` (Tansu honours it: the topic stays missing, a produce to it fails), so topics
  only come from ``inferlog topics`` (inferlog.epoch).
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiokafka.admin.client
import aiokafka.client
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.protocol.metadata import MetadataRequest
from pydantic import BaseModel


class _NoAutoCreation(MetadataRequest):
    """A metadata request that never creates the topics it names."""

    def __init__(self, topics: list[str] | None = None, allow_auto_topic_creation: bool | None = None) -> None:
        super().__init__(topics, allow_auto_topic_creation=False)


aiokafka.client.MetadataRequest = _NoAutoCreation  # type: ignore[misc]
aiokafka.admin.client.MetadataRequest = _NoAutoCreation  # type: ignore[misc]


def make_producer(bootstrap: str, *, request_timeout_ms: int = 10_000, **overrides: Any) -> AIOKafkaProducer:
    options: dict[str, Any] = dict(
        bootstrap_servers=bootstrap,
        enable_idempotence=False,
        acks="all",
        linger_ms=1,
        request_timeout_ms=request_timeout_ms,
    )
    options.update(overrides)
    return AIOKafkaProducer(**options)


def make_consumer(
    bootstrap: str, group_id: str | None, *, fetch_max_wait_ms: int = 10, **overrides: Any
) -> AIOKafkaConsumer:
    options: dict[str, Any] = dict(
        bootstrap_servers=bootstrap,
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=fetch_max_wait_ms,
        session_timeout_ms=10_000,
        heartbeat_interval_ms=1_000,
    )
    options.update(overrides)
    return AIOKafkaConsumer(**options)


def encode(record: BaseModel) -> bytes:
    return record.model_dump_json(exclude_none=True).encode()


def key_of(request_id: str | None) -> bytes | None:
    return request_id.encode() if request_id is not None else None


Outgoing = tuple[str, str | None, BaseModel]
"""(topic, request_id used as key, record)."""


async def publish_all(producer: AIOKafkaProducer, outgoing: list[Outgoing]) -> None:
    """Send every record, then wait until the broker has acknowledged all of them (raises if any failed)."""
    pending = [await producer.send(topic, encode(record), key=key_of(key)) for topic, key, record in outgoing]
    if pending:
        await asyncio.gather(*pending)
