"""ModelRunner: one loaded model driven by transformers' continuous batching manager.

The manager generates on its own thread; requests join and leave the running batch at every decode step.
Outputs come back on the asyncio loop through ``register_result_handler`` (``call_soon_threadsafe``), so
nothing here blocks the loop. Facts this module relies on (measured on transformers 5.24, DESIGN.md):
register the handler *before* ``add_request``; ``add_request`` returns None when the manager is stopping
or failed; streaming outputs carry all tokens so far; ``cancel_request`` never calls the handler.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from inferlog.models import RegisteredModel
from inferlog.prompting import IncrementalDecoder, PromptFormatter
from inferlog_worker import cb_shim

log = logging.getLogger(__name__)

class EngineFailed(Exception):
    """The engine itself failed: its thread crashed (transformers then fails every request of the batch)
    or it stopped making progress. No request's fault: the worker publishes nothing for what it ran."""


FinishReason = Literal["stop", "length", "cancelled", "expired", "error"]
TextSink = Callable[[str, str], None]
"""Called on the loop with (request_id, new visible text) as a generation streams."""


@dataclass(frozen=True)
class GenerationJob:
    request_id: str
    input_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class GenerationDone:
    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    first_token_at: float | None
    completed_at: float
    error: str | None = None


@dataclass(frozen=True)
class RunnerStats:
    active: int
    """Requests the manager is prefilling or decoding right now."""
    free_kv_blocks: int
    total_kv_blocks: int


@dataclass
class _Live:
    job: GenerationJob
    future: asyncio.Future[GenerationDone]
    tokens: list[int] = field(default_factory=list)
    first_token_at: float | None = None
    on_text: TextSink | None = None
    sent: str = ""
    """Text already passed to ``on_text``."""
    decoder: IncrementalDecoder | None = None
    """The text so far, decoded a step's new tokens at a time (only when someone reads it before the end)."""


class ModelRunner:
    def __init__(self, model: RegisteredModel, *, device: str, num_blocks: int, page_size: int,
                 max_batch_tokens: int, threads: int | None = None, test_hooks: str | None = None) -> None:
        self.model = model
        self._device = device
        self._num_blocks = num_blocks
        self._page_size = page_size
        self._max_batch_tokens = max_batch_tokens
        self.threads = threads or len(os.sched_getaffinity(0))
        """torch's intra-op threads (set at ``load``): by default the CPUs this process may run on."""
        self.version = ""
        self._formatter: PromptFormatter | None = None
        self._manager: Any = None
        self._eos: int | None = None
        self._live: dict[str, _Live] = {}
        self._test_hooks = test_hooks
        self.failure: str | None = None
        """Why the engine failed (set once); every live request's future then raises EngineFailed."""
        self.abandoned: set[str] = set()
        """The requests that were in the engine when it failed."""
        self.on_failure: Callable[[str], None] | None = None
        """Called once, on the loop, when the engine fails (the worker's main arms its hard exit)."""
        self.vocab_size = 0
        self.context_length = 0

    # -- lifecycle (blocking: call from a thread) --------------------------------------------------------

    def load(self) -> None:
        """Load the weights, start the manager. Blocking (seconds): run it off the event loop."""
        import torch
        from transformers import AutoModelForCausalLM, GenerationConfig
        from transformers.generation import ContinuousBatchingConfig

        device = self._device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        torch.set_num_threads(self.threads)  # (process-wide; the generation thread's matmuls use them)
        started = time.monotonic()
        model = AutoModelForCausalLM.from_pretrained(str(self.model.directory), dtype=dtype)
        model = model.to(device)  # type: ignore[arg-type]  # transformers' stub types .to() oddly
        self._formatter = PromptFormatter(self.model.directory)
        eos = model.generation_config.eos_token_id
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        self._eos = eos if eos is not None else self._formatter.eos_token_id
        self.version = self.model.version()
        # The greedy engine, with per-request sampling installed beside it (cb_shim.install_mixed_sampling): a
        # greedy request costs what the greedy engine costs, a sampled one adds only its own rows' sampling.
        generation_config = GenerationConfig(
            max_new_tokens=256, eos_token_id=self._eos if self._eos is not None else -1,
            pad_token_id=self._eos if self._eos is not None else 0, do_sample=False)
        cb_config = ContinuousBatchingConfig(
            num_blocks=self._num_blocks, page_size=self._page_size, max_batch_tokens=self._max_batch_tokens,
            max_queue_size=0, use_cuda_graph=False)  # (the mixed sampling step decides on the host)
        self._manager = model.init_continuous_batching(
            generation_config=generation_config, continuous_batching_config=cb_config)
        cb_shim.install_mixed_sampling(self._manager)
        self.vocab_size = int(model.config.vocab_size)
        self.context_length = self.model.context_length()
        if self._test_hooks:  # a module the tests name, to break the engine on purpose; never set otherwise
            import importlib

            importlib.import_module(self._test_hooks).install(self._manager)
        self._manager.start()
        log.info("loaded %s (%s) on %s in %.1fs, %d threads", self.model.name, self.version, device,
                 time.monotonic() - started, self.threads)

    def stop(self, hard: bool = False) -> None:
        """Stop the manager; ``hard`` drops what it still runs (its work was left uncommitted)."""
        if self._manager is not None:
            self._manager.stop(block=True, timeout=30, hard_stop=hard)

    # -- requests (on the event loop) -------------------------------------------------------------------

    def submit(self, job: GenerationJob, on_text: TextSink | None = None) -> asyncio.Future[GenerationDone]:
        """Start generating; the future resolves with the outcome, or raises EngineFailed if the engine
        fails meanwhile (so does this call, if it has). ``on_text`` receives the visible text as it grows
        (never a stop sequence, never half a UTF-8 character)."""
        if self.failure is not None:
            raise EngineFailed(self.failure)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[GenerationDone] = loop.create_future()
        live = _Live(job, future, on_text=on_text)
        self._live[job.request_id] = live
        try:
            self._manager.register_result_handler(job.request_id, lambda output: self._on_output(live, output))
            accepted = self._manager.add_request(
                job.input_ids, request_id=job.request_id, max_new_tokens=job.max_tokens, streaming=True,
                eos_token_id=-1 if job.ignore_eos else self._eos, temperature=float(job.temperature),
                top_p=float(job.top_p))
        except BaseException:
            self._live.pop(job.request_id, None)  # never left behind: the watchdog counts live requests
            raise
        if accepted is None:  # the manager is stopping or has failed: the engine's fault, not the request's
            self._unregister(job.request_id)
            self._live.pop(job.request_id, None)
            reason = cb_shim.stopped_reason(self._manager) or "the engine refused a request"
            self.fail(reason)
            raise EngineFailed(reason)
        return future

    def fail(self, reason: str) -> None:
        """The engine failed (or the watchdog says it hangs): every live request's future raises
        EngineFailed, and so will every later submit."""
        first = self.failure is None
        if first:
            self.failure = reason
            log.error("engine failed: %s", reason)
        live, self._live = list(self._live.values()), {}
        for item in live:
            if not item.future.done():
                self.abandoned.add(item.job.request_id)
                item.future.set_exception(EngineFailed(reason))
        if first and self.on_failure is not None:
            self.on_failure(reason)

    def stopped_reason(self) -> str | None:
        """Why the engine no longer generates, or None while it runs."""
        return cb_shim.stopped_reason(self._manager) if self._manager is not None else None

    def steps(self) -> int:
        """Generation steps completed so far (the watchdog's heartbeat)."""
        return cb_shim.steps_completed(self._manager) if self._manager is not None else 0

    def sampling_steps(self) -> dict[str, int]:
        """Engine steps that ran greedy only (no sampling work at all) and steps that sampled some rows."""
        return cb_shim.sampling_steps(self._manager) if self._manager is not None else {"greedy": 0, "sampled": 0}

    def cancel(self, request_id: str, reason: Literal["cancelled", "expired"] = "cancelled") -> bool:
        """Stop a request within one decode step and free its KV blocks; its future resolves with
        ``reason`` and the text so far. False if it is not running here."""
        live = self._live.get(request_id)
        if live is None:
            return False
        self._manager.cancel_request(request_id)
        self._unregister(request_id)  # cancel_request never calls the handler: clean up here
        self._resolve(live, reason, text=live.sent)
        return True

    def running_ids(self) -> list[str]:
        return list(self._live)

    def stats(self) -> RunnerStats:
        if self._manager is None:
            return RunnerStats(0, self._num_blocks, self._num_blocks)
        in_use = cb_shim.kv_blocks_in_use(self._manager)
        return RunnerStats(cb_shim.active_requests(self._manager), self._num_blocks - in_use, self._num_blocks)

    def _on_output(self, live: _Live, output: Any) -> None:
        if live.future.done():
            return
        if output.generated_tokens and live.first_token_at is None:
            live.first_token_at = time.time()
        live.tokens = list(output.generated_tokens)
        if output.error:
            reason = cb_shim.stopped_reason(self._manager)
            if reason is not None:  # the engine crashed and failed the whole batch: not this request's fault
                self.fail(f"{reason} ({output.error})")
                return
            self._resolve(live, "error", error=str(output.error))
            return
        assert self._formatter is not None
        if output.is_finished():
            text = self._formatter.decode(live.tokens)  # the result's text: decoded whole, once
        elif live.on_text is None and not live.job.stop:
            return  # no reader and no stop sequence: nothing to decode before the end
        else:
            live.decoder = live.decoder or self._formatter.decoder()
            try:
                text = live.decoder.extend(live.tokens)
            except Exception:  # noqa: BLE001 - never let one request's decoding drop a step's other outputs
                log.warning("incremental decoding of %s failed: decoding it whole", live.job.request_id,
                            exc_info=True)
                live.decoder = None
                text = self._formatter.decode(live.tokens)
        hits = [text.find(s) for s in live.job.stop if s in text]
        if hits:
            self._emit(live, text[: min(hits)], final=True)
            self._manager.cancel_request(live.job.request_id)
            self._unregister(live.job.request_id)
            self._resolve(live, "stop", text=text[: min(hits)])
            return
        if output.is_finished():
            self._emit(live, text, final=True)
            ended_on_eos = bool(live.tokens) and live.tokens[-1] == self._eos and not live.job.ignore_eos
            self._resolve(live, "stop" if ended_on_eos else "length", text=text)
            return
        self._emit(live, text, final=False)

    def _emit(self, live: _Live, text: str, *, final: bool) -> None:
        """Pass on the text not yet sent. Until the end, hold back a trailing partial character and any
        tail that could still become a stop sequence."""
        if not final:
            text = text.rstrip("\ufffd")
            if live.job.stop:
                text = text[: max(len(live.sent), len(text) - max(len(s) for s in live.job.stop) + 1)]
        if live.on_text is not None and len(text) > len(live.sent) and text.startswith(live.sent):
            live.on_text(live.job.request_id, text[len(live.sent):])
        if text.startswith(live.sent):
            live.sent = max(live.sent, text, key=len)

    def _resolve(self, live: _Live, reason: FinishReason, *,
                 text: str | None = None, error: str | None = None) -> None:
        self._live.pop(live.job.request_id, None)
        if live.future.done():
            return
        assert self._formatter is not None or text is not None or not live.tokens
        if text is None:
            text = self._formatter.decode(live.tokens) if self._formatter is not None else ""
        live.future.set_result(GenerationDone(
            request_id=live.job.request_id, token_ids=live.tokens, text=text, finish_reason=reason,
            first_token_at=live.first_token_at, completed_at=time.time(), error=error))

    def _unregister(self, request_id: str) -> None:
        cb_shim.unregister_handler(self._manager, request_id)
