"""The gateway against the real Postgres and broker: accept, poll, deduplicate, and refuse bad input with
a 4xx in the one envelope."""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from inferlog.config import InferlogSettings, ModelSpec
from inferlog.kafka import make_consumer
from inferlog.messages import RequestRecord
from inferlog.topics import Topics
from inferlog_gateway.main import create_app
from inferlog_gateway.settings import GatewaySettings
from tests.conftest import connect_to_schema

pytestmark = pytest.mark.integration

MAX_BODY = 8192
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
async def client(settings: InferlogSettings, tiny_dir: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[httpx.AsyncClient]:
    # Besides the run's models: one registered but never prepared, and one whose chat template raises
    # something other than a template error on some messages (a template is code).
    broken = tmp_path_factory.mktemp("models") / "bad-template"
    shutil.copytree(tiny_dir, broken)
    (broken / "chat_template.jinja").write_text(
        "{{ (1 / 0) if messages[0].content == 'boom' else messages[0].content }}")
    extra = [ModelSpec(name="unprepared", path=str(broken.parent / "nowhere")),
             ModelSpec(name="bad-template", path=str(broken))]
    common = settings.model_copy(update={"models": [*settings.models, *extra]})
    app = create_app(GatewaySettings(common=common, max_body_bytes=MAX_BODY))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
            yield http


async def read_requests_topic(settings: InferlogSettings, request_id: str) -> list[RequestRecord]:
    consumer = make_consumer(settings.kafka_bootstrap, group_id=None)
    consumer.subscribe([Topics.from_settings(settings).requests])
    await consumer.start()
    found: list[RequestRecord] = []
    try:
        for _ in range(20):
            batches = await consumer.getmany(timeout_ms=200)
            for batch in batches.values():
                found += [RequestRecord.model_validate_json(r.value) for r in batch
                          if r.key == request_id.encode()]
            if found:
                break
    finally:
        await consumer.stop()
    return found


async def ledger_row(settings: InferlogSettings, request_id: str) -> Any:
    conn = await connect_to_schema(settings)
    try:
        return await conn.fetchrow("SELECT status, published, payload_hash FROM requests WHERE request_id=$1",
                                   request_id)
    finally:
        await conn.close()


async def test_submit_claims_then_produces(client: httpx.AsyncClient, settings: InferlogSettings) -> None:
    response = await client.post("/v1/requests", json={"messages": CHAT, "max_tokens": 8, "request_id": "gw-1"})
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["id"] == "gw-1" and body["status"] == "queued"
    assert body["status_url"].endswith("/v1/requests/gw-1")
    row = await ledger_row(settings, "gw-1")
    assert row["published"] is True and row["status"] == "queued"
    [record] = await read_requests_topic(settings, "gw-1")
    assert record.params.max_tokens == 8 and record.timings.received_at and record.timings.queued_at

    poll = await client.get("/v1/requests/gw-1")
    assert poll.status_code == 200 and poll.json()["status"] == "queued"


async def test_same_id_same_payload_is_the_same_job(client: httpx.AsyncClient, settings: InferlogSettings) -> None:
    payload = {"messages": CHAT, "max_tokens": 8}
    first = await client.post("/v1/requests", json=payload, headers={"Idempotency-Key": "gw-idem"})
    again = await client.post("/v1/requests", json=payload, headers={"Idempotency-Key": "gw-idem"})
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == "gw-idem" and again.headers["Idempotent-Replayed"] == "true"
    assert len(await read_requests_topic(settings, "gw-idem")) == 1  # produced once

    other = await client.post("/v1/requests", json={**payload, "max_tokens": 9},
                              headers={"Idempotency-Key": "gw-idem"})
    assert other.status_code == 422
    assert other.json()["error"]["code"] == "idempotency_key_reused"


async def test_unknown_job_is_404_in_the_envelope(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/requests/no-such-job")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    missing_route = await client.get("/v1/nowhere")
    assert missing_route.status_code == 404 and "error" in missing_route.json()


LONG_PROMPT = "word " * 700  # the tiny model's context is 512 tokens
JSON = {"content-type": "application/json"}

BAD_INPUTS: list[tuple[str, bytes | dict[str, Any], dict[str, str], int, str | None]] = [
    ("malformed json", b'{"messages": [', JSON, 400, None),
    ("not an object", b"[1, 2]", JSON, 400, None),
    ("empty body", b"", JSON, 400, None),
    ("invalid utf-8", b'{"prompt": "\xff\xfe"}', JSON, 400, None),
    ("lone surrogate", b'{"prompt": "\\ud800 x"}', JSON, 400, None),
    ("wrong content type", b'{"prompt": "hi"}', {"content-type": "text/plain"}, 415, None),
    ("body too large", {"prompt": "x" * (MAX_BODY + 10)}, {}, 413, None),
    ("neither messages nor prompt", {"max_tokens": 5}, {}, 400, None),
    ("both messages and prompt", {"messages": CHAT, "prompt": "x"}, {}, 400, None),
    ("empty messages", {"messages": []}, {}, 400, "messages"),
    ("empty prompt", {"prompt": ""}, {}, 400, "prompt"),
    ("unknown role", {"messages": [{"role": "wizard", "content": "x"}]}, {}, 400, "messages[0].role"),
    ("missing content", {"messages": [{"role": "user"}]}, {}, 400, "messages[0].content"),
    ("unknown model", {"messages": CHAT, "model": "gpt-17"}, {}, 404, "model"),
    ("prompt beyond context", {"prompt": LONG_PROMPT}, {}, 400, "prompt"),
    ("max_tokens beyond context", {"messages": CHAT, "max_tokens": 600}, {}, 400, "max_tokens"),
    ("max_tokens zero", {"messages": CHAT, "max_tokens": 0}, {}, 400, "max_tokens"),
    ("max_tokens negative", {"messages": CHAT, "max_tokens": -1}, {}, 400, "max_tokens"),
    ("max_tokens huge", {"messages": CHAT, "max_tokens": 10**12}, {}, 400, "max_tokens"),
    ("max_tokens float", {"messages": CHAT, "max_tokens": 1.5}, {}, 400, "max_tokens"),
    ("max_tokens string", {"messages": CHAT, "max_tokens": "5"}, {}, 400, "max_tokens"),
    ("temperature negative", {"messages": CHAT, "temperature": -0.5}, {}, 400, "temperature"),
    ("temperature NaN", b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', JSON, 400,
     "temperature"),
    ("top_p zero", {"messages": CHAT, "top_p": 0}, {}, 400, "top_p"),
    ("top_p above one", {"messages": CHAT, "top_p": 1.5}, {}, 400, "top_p"),
    ("too many stops", {"messages": CHAT, "stop": ["a", "b", "c", "d", "e"]}, {}, 400, "stop"),
    ("request_id too long", {"messages": CHAT, "request_id": "r" * 200}, {}, 400, "request_id"),
    ("request_id bad chars", {"messages": CHAT, "request_id": "a/b"}, {}, 400, "request_id"),
    ("unknown field", {"messages": CHAT, "max_token": 5}, {}, 400, "max_token"),
    ("bad priority", {"messages": CHAT, "priority": "urgent"}, {}, 400, "priority"),
    ("seed while sampling", {"messages": CHAT, "seed": 7, "temperature": 0.7}, {}, 400, "seed"),
    ("NUL in the prompt", {"prompt": "a\u0000b"}, {}, 400, None),
    ("NUL in a message", {"messages": [{"role": "user", "content": "\u0000"}]}, {}, 400, None),
    ("integer too long to convert", b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", JSON, 400, None),
    ("NUL in a stop", {"messages": CHAT, "stop": ["a\u0000"]}, {}, 400, None),
    ("NUL in the session", {"messages": CHAT, "session_id": "s\u0000"}, {}, 400, None),
    ("NUL in the request_id", {"messages": CHAT, "request_id": "a\u0000b"}, {}, 400, None),
    ("NUL in an object key", b'{"prompt": "x", "a\\u0000": 1}', JSON, 400, None),
    ("empty stop", {"messages": CHAT, "stop": [""]}, {}, 400, "stop"),
    ("session too long", {"messages": CHAT, "session_id": "s" * 300}, {}, 400, "session_id"),
    ("model too long", {"messages": CHAT, "model": "m" * 300}, {}, 400, "model"),
    ("Idempotency-Key too long", {"messages": CHAT}, {"Idempotency-Key": "k" * 300}, 400, None),
    ("a model registered but not prepared", {"messages": CHAT, "model": "unprepared"}, {}, 404, "model"),
    ("a chat template that raises", {"messages": [{"role": "user", "content": "boom"}], "model": "bad-template"},
     {}, 400, "messages"),
]


@pytest.mark.parametrize("path", ["/v1/requests/a%00b", "/v1/requests/%01", "/v1/requests/" + "r" * 300,
                                  "/v1/requests/a%00b/stream"])
async def test_an_id_no_client_could_have_is_404(client: httpx.AsyncClient, path: str) -> None:
    for response in (await client.get(path), await client.delete(path.removesuffix("/stream"))):
        assert response.status_code == 404, response.text
        assert response.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize("created", ["nan", "inf", "1e300", "-5"])
async def test_a_forged_cursor_is_400(client: httpx.AsyncClient, created: str) -> None:
    import base64
    cursor = base64.urlsafe_b64encode(f"{created}|x".encode()).decode()
    response = await client.get("/v1/requests", params={"cursor": cursor})
    assert response.status_code == 400 and response.json()["error"]["param"] == "cursor", response.text


@pytest.mark.parametrize("since", ["1e300", "nan", "inf", "-1", "yesterday"])
async def test_a_since_no_clock_holds_is_400(client: httpx.AsyncClient, since: str) -> None:
    response = await client.get("/v1/requests", params={"since": since})
    assert response.status_code == 400 and response.json()["error"]["param"] == "since", response.text


@pytest.mark.parametrize(("case", "body", "headers", "status", "param"), BAD_INPUTS,
                         ids=[case[0] for case in BAD_INPUTS])
async def test_bad_input_gets_a_4xx_envelope(client: httpx.AsyncClient, case: str, body: bytes | dict[str, Any],
                                             headers: dict[str, str], status: int, param: str | None) -> None:
    if isinstance(body, dict):
        response = await client.post("/v1/requests", content=json.dumps(body).encode(),
                                     headers={"content-type": "application/json", **headers})
    else:
        response = await client.post("/v1/requests", content=body, headers=headers)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param, error


async def test_still_serving_after_bad_input(client: httpx.AsyncClient) -> None:
    for _ in range(3):
        await client.post("/v1/requests", content=b"{", headers=JSON)
    response = await client.post("/v1/requests", json={"messages": CHAT, "max_tokens": 4})
    assert response.status_code == 202
    ready = (await client.get("/readyz")).json()
    assert {k: ready[k] for k in ("ready", "checks")} == {"ready": True, "checks": {"postgres": "ok", "broker": "ok",
                                                                                   "outbox": "ok"}}
    assert ready["in_flight"] >= 1 and ready["awaiting_redrive"] == 0, ready
