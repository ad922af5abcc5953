"""KvAdmission: how much work the worker takes on, by KV-cache tokens and by count.

Pure Python, no broker, no model. A request reserves ``prompt + max_tokens`` tokens of KV capacity (its
worst case) for its whole life, so admitted work never runs out of cache mid-generation. Waiting work is
ordered interactive-first, then by arrival.

Nothing is preempted, so a batch backlog would take every slot and all the cache, and an interactive request
arriving then would wait for batch work to finish. Some slots and a share of the KV cache are therefore
interactive's alone (``Capacity.interactive_slots`` / ``interactive_kv_tokens``): batch work fills only the
rest, and ``wants`` tells the fetch loop, tier by tier, whether to fetch more of it, so interactive records
are still fetched while batch work waits for room.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from inferlog.messages import Priority

T = TypeVar("T")


@dataclass(frozen=True)
class Capacity:
    kv_tokens: int
    """KV cache capacity in tokens: num_blocks × page_size."""
    max_running: int
    """Most requests generating at once."""
    interactive_slots: int = 0
    """Of ``max_running``, the slots batch work never takes: batch work holds at most the others."""
    interactive_kv_tokens: int = 0
    """Of ``kv_tokens``, the tokens batch work never reserves."""


class KvAdmission(Generic[T]):
    def __init__(self, capacity: Capacity) -> None:
        self.capacity = capacity
        self._reserved: dict[str, int] = {}
        self._batch: set[str] = set()
        """The admitted requests of the batch tier."""
        self._waiting: dict[Priority, deque[tuple[str, int, T]]] = {p: deque() for p in Priority}

    @property
    def tokens_in_flight(self) -> int:
        return sum(self._reserved.values())

    @property
    def running(self) -> int:
        return len(self._reserved)

    @property
    def waiting(self) -> int:
        return sum(len(q) for q in self._waiting.values())

    def fits_ever(self, tokens: int) -> bool:
        """Whether a request of this size could run on an idle worker."""
        return tokens <= self.capacity.kv_tokens

    def offer(self, request_id: str, tokens: int, priority: Priority, item: T) -> None:
        """Queue work to admit when capacity allows."""
        self._waiting[priority].append((request_id, tokens, item))

    def admit_ready(self) -> list[T]:
        """Take waiting work, interactive first, while it fits. Order within a tier is kept (no overtaking)."""
        admitted = []
        for priority in (Priority.INTERACTIVE, Priority.BATCH):
            queue = self._waiting[priority]
            while queue and self._fits(queue[0][1], priority):
                request_id, tokens, item = queue.popleft()
                self._reserve(request_id, tokens, priority)
                admitted.append(item)
            if queue:
                break  # the head of a higher tier waits: the lower tier does not jump it
        return admitted

    def admit_first_matching(self, wanted: Callable[[T], bool]) -> T | None:
        """Admit the first waiting item ``wanted`` picks, if it fits, ahead of the others (which keep their
        places): how a quarantined request jumps the queue."""
        for priority, queue in self._waiting.items():
            for entry in queue:
                request_id, tokens, item = entry
                if wanted(item):
                    if not self._fits(tokens, priority):
                        return None
                    queue.remove(entry)
                    self._reserve(request_id, tokens, priority)
                    return item
        return None

    def discard_waiting(self, request_id: str) -> bool:
        """Drop waiting (not yet admitted) work; True if it was waiting."""
        for queue in self._waiting.values():
            for entry in queue:
                if entry[0] == request_id:
                    queue.remove(entry)
                    return True
        return False

    def release(self, request_id: str) -> None:
        self._reserved.pop(request_id, None)
        self._batch.discard(request_id)

    def _reserve(self, request_id: str, tokens: int, priority: Priority) -> None:
        self._reserved[request_id] = tokens
        if priority is Priority.BATCH:
            self._batch.add(request_id)

    def has_room(self) -> bool:
        """Whether to keep fetching at all: some tier ``wants`` more."""
        return any(self.wants(priority) for priority in Priority)

    def wants(self, priority: Priority) -> bool:
        """Whether to fetch more of this tier: none of it waits, another of it could start, and (batch) no
        interactive work waits either (batch never jumps it)."""
        if self._waiting[priority] or (priority is Priority.BATCH and self._waiting[Priority.INTERACTIVE]):
            return False
        return self.room(priority) > 0

    def room(self, priority: Priority) -> int:
        """How many more requests of this tier could start, by count."""
        free = self.capacity.max_running - self.running
        if priority is Priority.BATCH:
            free = min(free, self.capacity.max_running - self.capacity.interactive_slots - len(self._batch))
        return max(0, free)

    def _fits(self, tokens: int, priority: Priority) -> bool:
        if self.room(priority) < 1 or self.tokens_in_flight + tokens > self.capacity.kv_tokens:
            return False
        if priority is Priority.INTERACTIVE or not self._batch:
            return True  # (a batch request bigger than batch's share of the cache runs once no batch work runs)
        batch_tokens = sum(self._reserved[r] for r in self._batch)
        return batch_tokens + tokens <= self.capacity.kv_tokens - self.capacity.interactive_kv_tokens
