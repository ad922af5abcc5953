"""Per-partition commit watermarks for records that finish out of order.

A partition's committable offset is the lowest offset still unfinished; when none is unfinished, one past
the highest offset seen. Committing it never skips a record whose work is not durably handed on: after a
crash, everything from the watermark on is re-read (and deduplicated downstream).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from aiokafka import TopicPartition


@dataclass
class _Partition:
    unfinished: set[int] = field(default_factory=set)
    heap: list[int] = field(default_factory=list)
    """Min-heap over unfinished offsets, pruned lazily of finished ones."""
    next_offset: int | None = None
    """One past the highest offset seen."""
    committed: int | None = None
    """The last offset committed (or known committed)."""


class PartitionWatermarks:
    def __init__(self) -> None:
        self._parts: dict[TopicPartition, _Partition] = {}

    def track(self, tp: TopicPartition, offset: int) -> None:
        """A record was fetched: it is unfinished until ``finish``."""
        part = self._parts.setdefault(tp, _Partition())
        if offset in part.unfinished or (part.next_offset is not None and offset < part.next_offset):
            return  # seen already (a re-fetch after seek); its state stands
        part.unfinished.add(offset)
        heapq.heappush(part.heap, offset)
        part.next_offset = offset + 1

    def finish(self, tp: TopicPartition, offset: int) -> None:
        """The record's work is durably handed on."""
        part = self._parts.get(tp)
        if part is not None:
            part.unfinished.discard(offset)

    def committable(self, tp: TopicPartition) -> int | None:
        """The offset to commit for ``tp`` (the lowest unfinished one), or None if nothing was seen."""
        part = self._parts.get(tp)
        if part is None or part.next_offset is None:
            return None
        while part.heap and part.heap[0] not in part.unfinished:
            heapq.heappop(part.heap)
        return part.heap[0] if part.heap else part.next_offset

    def due(self) -> dict[TopicPartition, int]:
        """Partitions whose committable offset moved past what was last committed."""
        out = {}
        for tp, part in self._parts.items():
            offset = self.committable(tp)
            if offset is not None and (part.committed is None or offset > part.committed):
                out[tp] = offset
        return out

    def committed(self, tp: TopicPartition, offset: int) -> None:
        part = self._parts.get(tp)
        if part is not None and (part.committed is None or offset > part.committed):
            part.committed = offset

    def forget(self, tps: set[TopicPartition]) -> None:
        """Partitions revoked: their unfinished work is another consumer's to redo."""
        for tp in tps:
            self._parts.pop(tp, None)

    def owns(self, tp: TopicPartition) -> bool:
        return tp in self._parts

    def unfinished(self) -> int:
        return sum(len(p.unfinished) for p in self._parts.values())
