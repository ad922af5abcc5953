"""KvAdmission: how much work the worker takes on, by KV-cache tokens and by count.

Pure Python, no broker, no model. A request reserves ``prompt + max_tokens`` tokens of KV capacity (its
worst case) for its whole life, so admitted work never runs out of cache mid-generation. Waiting work is
ordered interactive-first, then by arrival.
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


class KvAdmission(Generic[T]):
    def __init__(self, capacity: Capacity) -> None:
        self.capacity = capacity
        self._reserved: dict[str, int] = {}
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
            while queue and self._fits(queue[0][1]):
                request_id, tokens, item = queue.popleft()
                self._reserved[request_id] = tokens
                admitted.append(item)
            if queue:
                break  # the head of a higher tier waits: the lower tier does not jump it
        return admitted

    def admit_first_matching(self, wanted: Callable[[T], bool]) -> T | None:
        """Admit the first waiting item ``wanted`` picks, if it fits, ahead of the others (which keep their
        places): how a quarantined request jumps the queue."""
        for queue in self._waiting.values():
            for entry in queue:
                request_id, tokens, item = entry
                if wanted(item):
                    if not self._fits(tokens):
                        return None
                    queue.remove(entry)
                    self._reserved[request_id] = tokens
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

    def has_room(self) -> bool:
        """Whether to keep fetching: nothing waits and another request could start."""
        return self.waiting == 0 and self.running < self.capacity.max_running

    def _fits(self, tokens: int) -> bool:
        return self.running < self.capacity.max_running and self.tokens_in_flight + tokens <= self.capacity.kv_tokens
