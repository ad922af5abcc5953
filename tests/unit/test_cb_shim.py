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
