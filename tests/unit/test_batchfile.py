"""``inferlog submit``'s file reading (inferlog.batchfile) and its output lines (inferlog.submitfile), without
services. The real path (broker, ledger, workers, a kill half-way) is tests/e2e/test_submit_file.py."""

from __future__ import annotations

import json
from typing import Any

import pytest

from inferlog.batchfile import check_namespace, derived_id, namespace_of, openai_request, read_lines
from inferlog.errors import InvalidRequest
from inferlog.identity import is_client_id
from inferlog.ledger import JobView
from inferlog.messages import Priority, Status
from inferlog.submitfile import output_line

MODELS = ["m", "n"]


def lines(*objects: Any, **options: Any) -> bytes:
    return b"\n".join(o if isinstance(o, bytes) else json.dumps(o).encode() for o in objects)


def openai(custom_id: str, **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}], **body}}


def read(data: bytes, **options: Any) -> list[Any]:
    return read_lines(data, namespace=options.pop("namespace", "ns"), known_models=MODELS, default_model="m",
                      **options)


def test_ids_are_namespaced_escaped_bounded_and_distinct() -> None:
    assert derived_id("ns", "1") == "ns.1" and derived_id("other", "1") != derived_id("ns", "1")
    odd = ["a/b", "a b", "a~2Fb", "ü", "x" * 300, "x" * 299 + "y"]
    ids = [derived_id("ns", c) for c in odd]
    assert all(is_client_id(i) for i in ids), ids
    assert len(set(ids)) == len(ids)  # escapes never collide with plain text, digests tell long ones apart
    assert namespace_of(b"a") == namespace_of(b"a") != namespace_of(b"b")


def test_both_formats_become_records_under_derived_ids() -> None:
    record = {"request_id": "r1", "model": "n", "params": {"max_tokens": 4}, "prompt": "p", "priority": "interactive"}
    got = read(lines(record, openai("c1", max_tokens=7, temperature=0, stop="\n"),
                     {**openai("c2"), "url": "/v1/completions", "body": {"model": "m", "prompt": ["once"]}}),
               tenant="acme")
    assert [(g.number, g.custom_id, g.openai, g.error) for g in got] == [
        (1, "r1", False, None), (2, "c1", True, None), (3, "c2", True, None)]
    first, chat, completion = (g.record for g in got)
    assert first.request_id == "ns.r1" and first.tenant == "acme" and first.priority is Priority.INTERACTIVE
    assert chat.request_id == "ns.c1" and chat.params.max_tokens == 7 and chat.params.stop == ["\n"]
    assert chat.priority is Priority.BATCH and chat.messages is not None and chat.params.temperature == 0
    assert completion.prompt == "once" and completion.params.temperature == 1.0  # OpenAI's default: sampled
    forced = read(lines(record), priority=Priority.BATCH)[0].record
    assert forced.priority is Priority.BATCH


def test_each_bad_line_is_its_own_error_and_the_rest_are_read() -> None:
    got = read(lines(openai("ok"), b"{not json", openai("ghost", model="gpt-4o"), openai("x" * 10, n=2),
                     b'{"custom_id": "big", "body": {"messages": [{"role": "user", "content": "' + b"y" * 2000 + b'"}]}}',
                     openai("ok"), [1, 2], {"neither": True}, b"", openai("tools", tools=[{"type": "function"}])),
               max_line_bytes=1000)
    errors = {g.number: g.error.code for g in got if g.error is not None}
    assert errors == {2: "invalid_json", 3: "model_not_found", 4: "unsupported_parameter", 5: "line_too_large",
                      6: "duplicate_custom_id", 7: "invalid_json", 8: "invalid_value",
                      10: "unsupported_parameter"}, errors
    assert [g.number for g in got if g.record is not None] == [1]
    assert "line 1" in next(g for g in got if g.number == 6).error.message


def test_openai_messages_take_text_parts_and_developer_role() -> None:
    record = openai_request({"model": "m", "messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]},
        request_id="r", tenant=None, default_model="m", chat=True)
    assert record.messages is not None
    assert [(m.role, m.content) for m in record.messages] == [("system", "be brief"), ("user", "ab")]
    with pytest.raises(InvalidRequest, match="text content"):
        openai_request({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, request_id="r",
                       tenant=None, default_model="m", chat=True)


def view(key: str, status: Status, **fields: Any) -> JobView:
    return JobView(key, status, "m", "v1", fields.get("text"), fields.get("finish_reason"), 3, 2,
                   fields.get("error"), {"completed_at": 100.0}, None)


def test_output_lines_in_openai_batch_format_or_the_jobs_outcome() -> None:
    chat, plain, bad = read(lines(openai("c"), {"request_id": "p", "model": "m", "params": {"max_tokens": 2},
                                                "prompt": "x"}, b"oops"))
    done = output_line(chat, view("ns.c", Status.COMPLETED, text="Paris.", finish_reason="stop"))
    assert done["custom_id"] == "c" and done["error"] is None and done["id"].startswith("batch_req_")
    body = done["response"]["body"]
    assert done["response"]["status_code"] == 200 and body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Paris.", "refusal": None}
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    failed = output_line(chat, view("ns.c", Status.FAILED, error={"code": "context_length_exceeded", "message": "m"}))
    assert failed["response"] is None and failed["error"]["code"] == "context_length_exceeded"
    open_job = output_line(chat, view("ns.c", Status.RUNNING))
    assert open_job["error"]["code"] == "unfinished"
    mine = output_line(plain, view("ns.p", Status.COMPLETED, text="t", finish_reason="length"))
    assert mine["request_id"] == "ns.p" and mine["status"] == "completed" and mine["result"]["text"] == "t"
    broken = output_line(bad, None)
    assert broken["error"]["code"] == "invalid_json" and broken["error"]["line"] == 3 and broken["result"] is None


def test_what_a_review_found_stays_fixed() -> None:
    # A digest-path ID and a short custom_id that spells the same text, and a record with no ID beside one
    # whose ID is its line number: four lines, four jobs.
    long = "a" * 200 + "26"
    digest = derived_id("ns", long)
    assert "~~" in digest and derived_id("ns", digest[3:]) != digest
    got = read(lines({"request_id": "3", "model": "m", "params": {"max_tokens": 1}, "prompt": "x"},
                     openai(long), {"model": "m", "params": {"max_tokens": 1}, "prompt": "no id"},
                     openai(digest[3:])))
    assert [g.error for g in got] == [None] * 4 and len({g.record.request_id for g in got}) == 4
    assert got[2].record.request_id == "ns.~~L3"
    # A lone surrogate in a prompt or a custom_id is that line's error, never the run's.
    bad = read(lines({"request_id": "s", "model": "m", "params": {"max_tokens": 1}, "prompt": "x\ud800"},
                     {**openai("ok"), "custom_id": "c\ud800"}, openai("fine")))
    assert [g.error.code if g.error else None for g in bad] == ["invalid_encoding", "invalid_custom_id", None]
    # A record's own tenant stands unless --tenant says otherwise; a namespace holds no '.'.
    record = {"request_id": "t", "tenant": "acme", "model": "m", "params": {"max_tokens": 1}, "prompt": "x"}
    assert read(lines(record))[0].record.tenant == "acme"
    assert read(lines(record), tenant="other")[0].record.tenant == "other"
    with pytest.raises(InvalidRequest, match="namespace"):
        check_namespace("batch.1")
    # OpenAI: max_tokens 0 is refused (not silently 256), n null is 1, JSON mode and penalties are refused.
    codes = [g.error.code if g.error else None for g in read(lines(
        openai("z", max_tokens=0), openai("n", n=None), openai("j", response_format={"type": "json_object"}),
        openai("p", presence_penalty=0.5), openai("q", presence_penalty=0)))]
    assert codes == ["invalid_value", None, "unsupported_parameter", "unsupported_parameter", None], codes
    # A byte-order mark before the first line is not part of it.
    assert read(b"\xef\xbb\xbf" + lines(openai("bom")))[0].error is None


def test_openai_bodies_are_typed_as_strictly_as_submits() -> None:
    def refused(**body: Any) -> str | None:
        try:
            openai_request({"model": "m", "messages": [{"role": "user", "content": "hi"}], **body}, request_id="r",
                           tenant=None, default_model="m", chat=True)
        except InvalidRequest as exc:
            return exc.param
        return None

    assert refused(model="") == "model" and refused(model=False) == "model"
    assert refused(max_tokens=True) == "max_tokens" and refused(max_tokens="10") == "max_tokens"
    assert refused(max_completion_tokens=0) == "max_completion_tokens" and refused(seed=True) == "seed"
    assert refused(temperature="0.5") == "temperature" and refused(echo=True) == "echo"
    assert refused(best_of=3) == "best_of" and refused(suffix="!") == "suffix"
    assert refused(logit_bias={}) is None and refused(best_of=1, echo=False, n=1) is None  # neutral values
