import json
from pathlib import Path

import jsonschema
import pytest

from inferlog.config import DEFAULT_MODEL_NAME
from inferlog.ledger import key_of
from inferlog.messages import EXPORTED_MODELS, GenerationParams, RequestRecord, Status

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"


def test_exported_schemas_match_the_models() -> None:
    for name, model in EXPORTED_MODELS.items():
        exported = json.loads((SCHEMAS / f"{name}.schema.json").read_text())
        assert exported == model.model_json_schema(), f"schemas/{name}.schema.json is stale: run inferlog schemas"


def test_the_example_request_is_what_the_schema_and_the_model_accept() -> None:
    """``schemas/examples/request.json`` is produced as it is by a direct producer (README): the exported
    schema, which producers in other languages validate with, and the model the tokenizer reads both take it."""
    example = json.loads((SCHEMAS / "examples" / "request.json").read_text())
    schema = json.loads((SCHEMAS / "request.v1.schema.json").read_text())
    jsonschema.validate(example, schema)
    record = RequestRecord.model_validate(example)
    assert record.model == DEFAULT_MODEL_NAME and key_of(record) == example["request_id"]  # its key as is
    with pytest.raises(jsonschema.ValidationError):  # the schema does check: no params, no record
        jsonschema.validate({k: v for k, v in example.items() if k != "params"}, schema)


def test_status_moves_forward_and_terminals_share_the_top_rank() -> None:
    order = [Status.RECEIVED, Status.QUEUED, Status.TOKENIZED, Status.RUNNING, Status.COMPLETED]
    assert [s.rank for s in order] == sorted(s.rank for s in order)
    assert {s.rank for s in Status if s.is_terminal()} == {100}
    assert not Status.RUNNING.is_terminal()


def test_request_repr_hides_prompt() -> None:
    record = RequestRecord(request_id="r1", model="m", prompt="secret prompt",
                           params=GenerationParams(max_tokens=4))
    assert "secret" not in repr(record)


def test_a_result_with_a_non_terminal_status_is_refused() -> None:
    import pytest
    from pydantic import ValidationError

    from inferlog.messages import ResultRecord

    for status in ("received", "queued", "tokenized", "running"):
        with pytest.raises(ValidationError, match="terminal"):
            ResultRecord.model_validate({"request_id": "r", "status": status})
    assert ResultRecord.model_validate({"request_id": "r", "status": "expired"}).status is Status.EXPIRED


def test_a_dead_letter_keeps_a_bounded_prefix_with_the_length_and_hash_of_the_whole() -> None:
    import hashlib

    from inferlog.messages import DEAD_LETTER_VALUE_CHARS, dead_letter

    huge = b"\xff" + b"x" * 2_000_000  # not even UTF-8
    letter = dead_letter("s", "e" * 10_000, topic="t", partition=0, offset=1, request_id="r", value=huge)
    assert len(letter.value) == DEAD_LETTER_VALUE_CHARS and letter.truncated and len(letter.error) <= 2000
    assert letter.value_bytes == len(huge) and letter.value_sha256 == hashlib.sha256(huge).hexdigest()
    assert len(letter.model_dump_json()) < 64_000, "a dead letter must fit where its record did not"
    small = dead_letter("s", "e", topic="t", partition=0, offset=1, request_id=None, value=b'{"a": 1}')
    assert small.value == '{"a": 1}' and not small.truncated and small.value_bytes == 8


def test_generated_text_round_trips_through_the_store_whatever_its_characters() -> None:
    from inferlog.ledger import load_text, store_text

    for text in ("plain", "", "a\x00b", "\x00", "lone \ud800 surrogate", "emoji \U0001f600 and \\u0000 literal",
                 '"quoted"\x00'):
        stored, escaped = store_text(text)
        assert stored is not None and "\x00" not in stored
        stored.encode("utf-8")  # what Postgres and asyncpg must be able to take
        assert load_text(stored, escaped) == text, text
    assert store_text("plain") == ("plain", False) and store_text(None) == (None, False)
