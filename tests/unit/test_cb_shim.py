"""The worker reads transformers' continuous batching internals only through ``cb_shim``; this pins those
internals to the installed version, so an upgrade that moves one fails here, not in a worker."""

from __future__ import annotations

import inspect

import transformers
from transformers.generation.continuous_batching import continuous_api, scheduler

from inferlog_worker import cb_shim


def test_the_shim_is_pinned_to_the_installed_transformers() -> None:
    assert transformers.__version__ == cb_shim.PINNED_TRANSFORMERS, (
        "transformers changed: re-check every function in inferlog_worker/cb_shim.py against it, then "
        "update PINNED_TRANSFORMERS")


def test_the_internals_the_shim_reads_are_where_it_reads_them() -> None:
    manager_src = inspect.getsource(continuous_api.ContinuousBatchingManager)
    for attribute in ("self.output_router", "self.batch_processor", "self.current_batch",
                      "self.background_thread_status", "self._generation_thread", "def is_running"):
        assert attribute in manager_src, attribute
    assert "self._lock" in inspect.getsource(continuous_api.OutputRouter)
    assert "self.result_handlers" in inspect.getsource(continuous_api.OutputRouter)
    assert "def can_accept_new_requests" in inspect.getsource(continuous_api.BackgroundThreadStatus)
    assert "self.active_requests" in inspect.getsource(scheduler)
    # A crashed batch: the hard stop is requested before the batch's requests are failed, which is what
    # lets stopped_reason() tell an engine failure from one request's error.
    critical = inspect.getsource(continuous_api.ContinuousBatchingManager._handle_critical_error)
    assert critical.index("request_stop") < critical.index("_fail_all_remaining_requests")


def test_the_sampling_step_the_shim_replaces_is_where_it_replaces_it() -> None:
    """install_mixed_sampling relies on: the model runner calls the manager's logit processor whenever
    do_processing is set, with one argument column per logits row, and takes the argmax when do_sample is
    false; the arguments are filled per request from add_request's keywords."""
    from transformers.generation.continuous_batching import cb_logits_processors, model_runner

    step = inspect.getsource(model_runner)
    assert "if self.logit_processor.do_processing:" in step
    assert 'self.logit_processor(sliced_input_ids_2d, logits_2d, batch_data["logits_processor_args"])' in step
    assert "torch.argmax(probs, dim=-1, keepdim=True)" in step
    processors = inspect.getsource(cb_logits_processors)
    assert 'request.state.logit_processor_kwargs.get("temperature", self.temperature)' in processors
    assert 'request.state.logit_processor_kwargs.get("top_p", self.top_p)' in processors
    assert "requests_with_new_token = [request for request in requests_in_batch if request.has_new_token]" \
        in processors
    # MixedSampling overrides the list's prepare_tensor_args (to reset the columns it leaves stale)
    assert "def prepare_tensor_args(\n        self, requests_in_batch: list[FutureRequestState], arg_storage" \
        in processors
