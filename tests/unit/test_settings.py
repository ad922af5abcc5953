import pytest
from pydantic import ValidationError

from inferlog.config import InferlogSettings, ModelSpec
from inferlog_worker.settings import WorkerSettings


def test_default_model_must_be_registered() -> None:
    with pytest.raises(ValidationError, match="INFERLOG_DEFAULT_MODEL"):
        InferlogSettings(models=[ModelSpec(name="a", path="/x")], default_model="b")


def test_models_parse_from_json_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERLOG_MODELS", '[{"name": "a", "path": "/m"}]')
    monkeypatch.setenv("INFERLOG_DEFAULT_MODEL", "a")
    assert InferlogSettings().models[0].path == "/m"


def test_worker_cross_field_checks_say_what_to_change() -> None:
    with pytest.raises(ValidationError, match="INFERLOG_WORKER_NUM_BLOCKS"):
        WorkerSettings(num_blocks=4, page_size=16, max_batch_tokens=512)
    with pytest.raises(ValidationError, match="HEARTBEAT_INTERVAL_MS"):
        WorkerSettings(session_timeout_ms=3000, heartbeat_interval_ms=2000)
