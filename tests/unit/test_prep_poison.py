"""Direct records that used to stop the tokenizer (a NUL anywhere, a multi-kilobyte tenant, an empty stop
sequence, a NaN deadline) are refused at parsing: each becomes a dead letter, plus a ``failed`` result
when it names a job key a result can carry; parsing never raises."""

from __future__ import annotations

import json
from typing import Any

import pytest

from inferlog.messages import ResultRecord, Status
from inferlog_tokenizer.prep import RawRecord, RequestPreparer

GOOD: dict[str, Any] = {"request_id": "r", "model": "m", "prompt": "hi", "params": {"max_tokens": 4}}

POISONS: list[tuple[str, dict[str, Any] | bytes, str | None]] = [
    ("NUL in content", {**GOOD, "prompt": None, "messages": [{"role": "user", "content": "a\u0000"}]}, "r"),
    ("NUL in the prompt", {**GOOD, "prompt": "a\u0000b"}, "r"),
    ("NUL in a stop", {**GOOD, "params": {"max_tokens": 4, "stop": ["\u0000"]}}, "r"),
    ("NUL in the session", {**GOOD, "session_id": "s\u0000"}, "r"),
    ("NUL in the tenant", {**GOOD, "tenant": "t\u0000"}, "#"),  # the tenant is hashed into the key
    ("NUL in the model", {**GOOD, "model": "m\u0000"}, "r"),
    ("NUL in the request_id", {**GOOD, "request_id": "a\u0000b"}, None),
    ("a 3 KB tenant", {**GOOD, "tenant": "t" * 3000}, "#"),
    ("an empty stop", {**GOOD, "params": {"max_tokens": 4, "stop": [""]}}, "r"),
    ("a NaN deadline", b'{"request_id": "r", "model": "m", "prompt": "hi", "params": {"max_tokens": 4}, '
                       b'"deadline_at": NaN}', "r"),
    ("a 2 MB record", {**GOOD, "prompt": "x" * 2_000_000}, "r"),
    ("a lone surrogate in the request_id", b'{"request_id": "\\ud800x", "model": "m", "prompt": "hi", '
                                           b'"params": {"max_tokens": 4}}', None),
]


@pytest.mark.parametrize(("case", "value", "failed_key"), POISONS, ids=[p[0] for p in POISONS])
def test_a_poison_direct_record_is_a_dead_letter_never_a_crash(case: str, value: dict[str, Any] | bytes,
                                                                failed_key: str | None) -> None:
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    preparer = RequestPreparer(None, 4096)  # type: ignore[arg-type]  # parsing needs no model
    parsed, out = preparer.parse([RawRecord("p.requests.v1", 0, 7, b"k\x00ey", raw)])
    assert parsed == [] and len(out.dead) == 1 and out.dead[0].offset == 7
    assert len(out.dead[0].model_dump_json()) < 64_000
    if failed_key is None:
        assert out.results == []
    else:
        [result] = out.results
        assert result.status is Status.FAILED and result.request_id.startswith(failed_key)
        ResultRecord.model_validate_json(result.model_dump_json())  # every stage can read it back
