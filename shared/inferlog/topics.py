"""Topic names and their creation.

Topics are created explicitly with their partition counts and checked at start-up: the broker here
(Tansu) creates an unknown topic on a metadata request that allows it (inferlog.kafka's never do), so a typo
would otherwise silently make a new one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from inferlog.config import InferlogSettings
from inferlog.errors import ConfigError
from inferlog.messages import Priority

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Topics:
    """Every topic name, derived from one prefix (``inferlog.requests.v1`` …)."""

    prefix: str
    partitions: int

    @classmethod
    def from_settings(cls, settings: InferlogSettings) -> Topics:
        return cls(settings.topic_prefix, settings.topic_partitions)

    @property
    def requests(self) -> str:
        return f"{self.prefix}.requests.v1"

    @property
    def tokenized_interactive(self) -> str:
        return f"{self.prefix}.tokenized.interactive.v1"

    @property
    def tokenized_batch(self) -> str:
        return f"{self.prefix}.tokenized.batch.v1"

    def tokenized(self, priority: Priority) -> str:
        return self.tokenized_interactive if priority is Priority.INTERACTIVE else self.tokenized_batch

    @property
    def events(self) -> str:
        return f"{self.prefix}.events.v1"

    @property
    def results(self) -> str:
        return f"{self.prefix}.results.v1"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}.dlq.v1"

    @property
    def meta(self) -> str:
        """The broker's epoch markers (inferlog.epoch): one record each time a log is started."""
        return f"{self.prefix}.meta.v1"

    def group(self, service: str) -> str:
        """A service's consumer group, under the same prefix, so deployments sharing a broker never mix."""
        return f"{self.prefix}.{service}"

    def layout(self) -> dict[str, int]:
        """Each topic with the partition count it must have."""
        return {
            self.requests: self.partitions,
            self.tokenized_interactive: self.partitions,
            self.tokenized_batch: self.partitions,
            self.events: self.partitions,
            self.results: self.partitions,
            self.dlq: 1,
            self.meta: 1,
        }


async def group_is_consuming(bootstrap: str, group: str) -> bool:
    """Whether ``group`` has settled (Stable) with at least one member: its consumers are fetching."""
    from aiokafka.admin import AIOKafkaAdminClient  # here, so topic names alone import no client

    import inferlog.kafka  # noqa: F401 - its import turns topic auto-creation off

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5_000)
    await admin.start()
    try:
        [response] = await admin.describe_consumer_groups([group])
        [described] = response.groups
        return bool(described[0] == 0 and described[2] == "Stable" and described[5])
    finally:
        await admin.close()


async def ensure_topics(bootstrap: str, topics: Topics, *, create: bool = True) -> None:
    """Create missing topics, then check every topic has the partition count the layout says.

    Raises ConfigError when a topic is missing (and ``create`` is False) or has another partition count,
    naming the topic, so a service refuses to start on a mis-wired broker.
    """
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    import inferlog.kafka  # noqa: F401 - its import turns topic auto-creation off

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        wanted = topics.layout()
        existing = set(await admin.list_topics())
        missing = [name for name in wanted if name not in existing]
        if missing and not create:
            raise ConfigError(f"topics missing on {bootstrap}: {missing}; run `inferlog topics`")
        if missing:
            log.info("creating topics %s", missing)
            response = await admin.create_topics([NewTopic(name, wanted[name], 1) for name in missing])
            for name, code, message in response.topic_errors:
                if code not in (0, 36):  # 36: already exists (a concurrent creator won)
                    raise ConfigError(f"could not create topic {name}: error {code} {message}")
        described = await admin.describe_topics(list(wanted))
        for topic in described:
            name, count = topic["topic"], len(topic["partitions"])
            if topic["error_code"] != 0 or count != wanted[name]:
                raise ConfigError(
                    f"topic {name} has {count} partitions (error {topic['error_code']}), "
                    f"expected {wanted[name]}: delete it or set INFERLOG_TOPIC_PARTITIONS={count}"
                )
    finally:
        await admin.close()
