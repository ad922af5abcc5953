"""Every private part of transformers' continuous batching manager the worker touches, in one place.

transformers 5.24 exposes no public way to unregister a result handler, to read the KV block tables, to
count active requests, to tell a stopping or crashed engine from a live one, or to count completed
generation steps. These functions read the manager's internals; ``tests/unit/test_cb_shim.py`` pins them to
the installed version, so an upgrade that moves any of them fails a test instead of the worker.
"""

from __future__ import annotations

from typing import Any

PINNED_TRANSFORMERS = "5.24.0"
"""The version whose internals these functions read."""


def unregister_handler(manager: Any, request_id: str) -> None:
    """Forget a request's result handler (``cancel_request`` never calls it; we resolve it ourselves)."""
    router = manager.output_router
    with router._lock:  # the manager's own lock around its handler table
        router.result_handlers.pop(request_id, None)


def active_requests(manager: Any) -> int:
    """Requests the manager is prefilling or decoding right now (0 before its thread set up)."""
    processor = manager.batch_processor
    return len(processor.scheduler.active_requests) if processor is not None else 0


def kv_blocks_in_use(manager: Any) -> int:
    """KV blocks held by live requests. Blocks kept for prefix reuse after their request ended are
    reclaimable on demand, so they count as free. The tables belong to the generation thread: each is
    copied in one step (atomic under the GIL) before it is read."""
    processor = manager.batch_processor
    if processor is None:
        return 0
    allocators = list(processor.cache.cache_allocators.values())
    return max((len({b for blocks in list(a.block_table.values()) for b in blocks}) for a in allocators),
               default=0)


def steps_completed(manager: Any) -> int:
    """Generation steps (forward passes) completed so far: the engine's heartbeat. A step, not a token:
    a long prefill yields no token but still completes a step."""
    return int(manager.current_batch or 0) if hasattr(manager, "current_batch") else 0


def stopped_reason(manager: Any) -> str | None:
    """Why the engine no longer generates (its thread crashed, or it is stopping), or None while it runs.
    The manager requests its hard stop *before* failing the requests of a crashed batch, so an error
    output that arrives while this is not None is the engine's failure, not the request's."""
    reason: str | None = manager.background_thread_status.can_accept_new_requests()
    if reason is None and manager._generation_thread is not None and not manager.is_running():
        reason = "The generation thread is not alive."
    return reason
