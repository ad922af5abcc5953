"""Direct records that used to stop the tokenizer (a NUL anywhere, a multi-kilobyte tenant, an empty stop
sequence, a NaN deadline) are refused at parsing: each becomes a dead letter, plus a ``failed`` result
when it names a job key a result can carry; parsing never raises."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from inferlog.config import InferlogSettings, ModelSpec
from inferlog.messages import ResultRecord, Status
from inferlog.models import ModelRegistry
from inferlog.testing import TOKENIZER_FILES
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


def test_a_request_id_no_client_could_poll_is_refused() -> None:
    """A direct record's ``request_id`` is what its producer polls by: one with ``/`` (a path separator) could
    never be polled, so it is refused loudly, with its failed result under the job key on the results topic."""
    raw = json.dumps({**GOOD, "request_id": "a/b"}).encode()
    parsed, out = RequestPreparer(None, 4096).parse([RawRecord("p.requests.v1", 0, 3, b"a/b", raw)])  # type: ignore[arg-type]
    assert parsed == [] and len(out.dead) == 1 and "request_id" in out.dead[0].error
    [result] = out.results
    assert result.request_id == "/a/b" and result.status is Status.FAILED


@pytest.fixture
def models(smol_dir: Path, tmp_path: Path) -> ModelRegistry:
    """Three registered models: one whose files are there, one never prepared, one whose chat template raises
    something other than a template error (a template is code)."""
    def tokenizer_only(name: str, template: str | None = None) -> Path:
        directory = tmp_path / name
        directory.mkdir()
        for file in TOKENIZER_FILES:
            if (smol_dir / file).is_file():
                shutil.copy(smol_dir / file, directory / file)
        (directory / "config.json").write_text('{"max_position_embeddings": 512}')
        if template is not None:
            (directory / "chat_template.jinja").write_text(template)
        return directory

    specs = [ModelSpec(name="ok", path=str(tokenizer_only("ok"))),
             ModelSpec(name="unprepared", path=str(tmp_path / "nowhere")),
             ModelSpec(name="bad-template", path=str(tokenizer_only(
                 "bad-template", "{{ (1 / 0) if messages[0].content == 'boom' else messages[0].content }}"))),
             ModelSpec(name="uncompilable", path=str(tokenizer_only("uncompilable", "{% for m in messages %}{{ m }"))),
             ModelSpec(name="corrupt", path=str(tokenizer_only("corrupt")))]
    (tmp_path / "corrupt" / "tokenizer.json").write_text('{"trunc')
    return ModelRegistry(InferlogSettings(models=specs, default_model="ok"))


def test_a_model_that_cannot_be_served_fails_its_records_not_the_batch(models: ModelRegistry) -> None:
    chat = [{"role": "user", "content": "hi"}]
    records = [
        {**GOOD, "request_id": "a", "model": "ok", "prompt": None, "messages": chat},
        {**GOOD, "request_id": "b", "model": "unprepared"},
        {**GOOD, "request_id": "c", "model": "bad-template", "prompt": None,
         "messages": [{"role": "user", "content": "boom"}]},
        {**GOOD, "request_id": "d", "model": "bad-template", "prompt": None, "messages": chat},
        {**GOOD, "request_id": "e", "model": "ok"},
        {**GOOD, "request_id": "f", "model": "uncompilable", "prompt": None, "messages": chat},
        {**GOOD, "request_id": "g", "model": "corrupt"},
    ]
    raws = [RawRecord("p.requests.v1", 0, i, r["request_id"].encode(), json.dumps(r).encode())
            for i, r in enumerate(records)]
    preparer = RequestPreparer(models, 4096)
    parsed, out = preparer.parse(raws)
    out = preparer.prepare_parsed(parsed, out)
    assert sorted(t.request_id for t in out.tokenized) == ["a", "d", "e"]
    failed = {r.request_id: r.error for r in out.results}
    assert set(failed) == {"b", "c", "f", "g"} and {d.request_id for d in out.dead} == {"b", "c", "f", "g"}
    for key in "bfg":
        assert failed[key] is not None and failed[key].code == "model_not_ready" and failed[key].param == "model"
    assert failed["c"] is not None and failed["c"].code == "chat_template_error"
    assert failed["c"].param == "messages" and "ZeroDivisionError" in failed["c"].message
