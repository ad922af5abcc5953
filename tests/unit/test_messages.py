import json
from pathlib import Path

from inferlog.messages import EXPORTED_MODELS, GenerationParams, RequestRecord, Status

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"


def test_exported_schemas_match_the_models() -> None:
    for name, model in EXPORTED_MODELS.items():
        exported = json.loads((SCHEMAS / f"{name}.schema.json").read_text())
        assert exported == model.model_json_schema(), f"schemas/{name}.schema.json is stale: run inferlog schemas"


def test_status_moves_forward_and_terminals_share_the_top_rank() -> None:
    order = [Status.RECEIVED, Status.QUEUED, Status.TOKENIZED, Status.RUNNING, Status.COMPLETED]
    assert [s.rank for s in order] == sorted(s.rank for s in order)
    assert {s.rank for s in Status if s.is_terminal()} == {100}
    assert not Status.RUNNING.is_terminal()


def test_request_repr_hides_prompt() -> None:
    record = RequestRecord(request_id="r1", model="m", prompt="secret prompt",
                           params=GenerationParams(max_tokens=4))
    assert "secret" not in repr(record)
