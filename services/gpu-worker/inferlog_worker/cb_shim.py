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


def install_mixed_sampling(manager: Any) -> None:
    """One engine for greedy and sampled requests, each paying only for what it asks.

    The manager runs as transformers' greedy engine (``do_sample=False``: an argmax over the logits). This
    installs per-request temperature and top-p *arguments* (each request's ``temperature``/``top_p``
    keywords at ``add_request``; 0.0 is greedy) and replaces the processing step: in a step where every
    request is greedy it returns the logits untouched, so the step costs what the greedy engine's does; where
    some sample, only their rows are scaled, top-p filtered (only rows with ``top_p < 1``), and sampled, and
    each sampled row is made one-hot at its pick so the manager's argmax returns it. transformers' own
    sampling mode runs temperature and a top-p sort over every row of every step, greedy or not.

    Call before ``manager.start()`` (the generation thread reads ``manager.logit_processor`` when it starts).
    The processing step reads a tensor on the host once per step to decide, so it suits CPU and eager CUDA,
    not CUDA graphs (``runner.py`` turns those off).
    """
    from transformers.generation.continuous_batching.cb_logits_processors import (
        ContinuousBatchingLogitsProcessorList,
    )
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopPLogitsWarper,
    )

    processors = ContinuousBatchingLogitsProcessorList(
        LogitsProcessorList([TemperatureLogitsWarper(1.5), TopPLogitsWarper(0.5)]), per_request_processors=True)
    temperature, top_p = processors.logits_processor
    temperature.temperature = 0.0  # the default of a row that names none (and of padding): greedy
    top_p.top_p = 1.0
    assert processors.tensors_required == 2 and processors.do_processing
    processors.__class__ = _mixed_sampling_class(ContinuousBatchingLogitsProcessorList)
    processors.steps = {"greedy": 0, "sampled": 0}  # type: ignore[attr-defined]  # (MixedSampling's counters)
    manager.logit_processor = processors


def sampling_steps(manager: Any) -> dict[str, int]:
    """How many engine steps ran greedy only (the logits untouched) and how many sampled some rows."""
    return dict(manager.logit_processor.steps)


def _mixed_sampling_class(base: type) -> type:
    import torch

    _GREEDY_BITS = int(torch.tensor(0.0, dtype=torch.float32).view(torch.int32))
    _TOP_P_ONE_BITS = int(torch.tensor(1.0, dtype=torch.float32).view(torch.int32))

    class MixedSampling(base):  # type: ignore[misc, valid-type]
        """Arguments row 0: temperature, row 1: top_p (float32 viewed as int32), one column per logits row."""

        def prepare_tensor_args(self, requests_in_batch: list[Any], arg_storage: Any) -> Any:
            """transformers fills a column per request with a new token, and leaves the columns after them
            (a request mid-prefill has a logits row but no new token) as earlier steps left them: reset those
            to greedy, so a stale temperature never samples a row nobody asked to sample."""
            arg_storage = super().prepare_tensor_args(requests_in_batch, arg_storage)
            filled = sum(1 for request in requests_in_batch if request.has_new_token)
            arg_storage[0, filled:] = _GREEDY_BITS
            arg_storage[1, filled:] = _TOP_P_ONE_BITS
            return arg_storage

        def __call__(self, input_ids: Any, scores: Any, logits_processor_args: Any) -> Any:
            rows = scores.size(0)
            temperature = logits_processor_args[0, :rows].view(torch.float32)
            sampled = temperature > 0
            if not bool(sampled.any()):
                self.steps["greedy"] += 1
                return scores  # every row greedy: the manager's argmax is the whole cost
            self.steps["sampled"] += 1
            picked = sampled.nonzero().squeeze(-1)
            logits = scores[picked]
            # Relative to each row's top logit first: however small the temperature (1e-39 is a float32 above
            # 0), the top stays 0 and the rest go to -inf at worst, so softmax never sees inf - inf (NaN).
            logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature[picked].unsqueeze(-1)
            top_p = logits_processor_args[1, :rows].view(torch.float32)[picked]
            narrowed = (top_p < 1).nonzero().squeeze(-1)
            if narrowed.numel():
                logits[narrowed] = _nucleus(logits[narrowed], top_p[narrowed])
            tokens = torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1).squeeze(-1)
            scores[picked] = float("-inf")
            scores[picked, tokens] = 0.0  # one-hot at the pick: the manager's argmax returns it
            return scores

    def _nucleus(logits: Any, top_p: Any) -> Any:
        """Keep each row's smallest set of tokens whose probability reaches its ``top_p`` (transformers'
        TopPLogitsWarper, per row)."""
        ordered, order = torch.sort(logits, descending=False, dim=-1)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - top_p).unsqueeze(-1)
        drop[..., -1:] = False
        return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))

    return MixedSampling
