"""The dispatch core is transport-free: importing it loads none of aiokafka, redis, asyncpg, torch or
transformers (transitive imports included), so its protocol is tested with fakes in milliseconds."""

from __future__ import annotations

import json
import subprocess
import sys

FORBIDDEN = ("aiokafka", "redis", "asyncpg", "torch", "transformers")


def _loaded_after_import(module: str) -> set[str]:
    probe = (f"import json, sys; import {module}; "
             f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return set(json.loads(out)) & set(FORBIDDEN)


def test_the_dispatch_core_imports_no_transport_and_no_model_stack() -> None:
    assert _loaded_after_import("inferlog_worker.dispatch") == set()


def test_the_check_sees_a_transport_import() -> None:  # the positive control
    assert _loaded_after_import("inferlog_worker.shell") >= {"aiokafka", "redis"}
