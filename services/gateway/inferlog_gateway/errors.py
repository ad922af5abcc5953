"""Every error a client sees, in one envelope: ``{"error": {"message", "type", "param", "code"}}``.

FastAPI's own 422 for validation and Starlette's plain-text 404/405 are replaced, and an unexpected
exception is a 500 in the same envelope, logged here with its traceback but never sent to the client.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from inferlog.admission import Overloaded
from inferlog.errors import BrokerUnavailable, InvalidRequest, StoreUnavailable

log = logging.getLogger(__name__)

_HTTP_CODES = {
    404: ("not_found", "invalid_request_error"),
    405: ("method_not_allowed", "invalid_request_error"),
    413: ("request_too_large", "invalid_request_error"),
    415: ("unsupported_media_type", "invalid_request_error"),
}


def envelope(status: int, message: str, *, type_: str, code: str | None, param: str | None = None,
             headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(status_code=status, content=body, headers=headers)


def param_of(loc: tuple[Any, ...]) -> str | None:
    """``("body", "messages", 0, "role")`` → ``messages[0].role``."""
    parts = [p for p in loc if p not in ("body", "query", "path")]
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not (isinstance(part, str) and part.startswith("function-")):
            out += ("." if out else "") + str(part)
    return out or None


def validation_response(errors: list[Any]) -> JSONResponse:
    first = errors[0]
    param = param_of(tuple(first.get("loc", ())))
    message = first.get("msg", "invalid value")
    if param:
        message = f"{param}: {message}"
    return envelope(400, message, type_="invalid_request_error", code="invalid_value", param=param)


def install(app: FastAPI, retry_after_s: int) -> None:
    retry = {"Retry-After": str(retry_after_s)}

    @app.exception_handler(InvalidRequest)
    async def _invalid(_: Request, exc: InvalidRequest) -> JSONResponse:
        return envelope(exc.status_code, exc.message, type_=exc.error_type, code=exc.code, param=exc.param)

    @app.exception_handler(Overloaded)
    async def _overloaded(_: Request, exc: Overloaded) -> JSONResponse:
        return envelope(429, exc.message, type_="rate_limit_error", code=exc.code,
                        headers={"Retry-After": str(exc.retry_after_s)})

    @app.exception_handler(StoreUnavailable)
    async def _store(_: Request, exc: StoreUnavailable) -> JSONResponse:
        log.warning("store unavailable: %s", exc)
        return envelope(503, "The request store is unavailable; retry later.", type_="service_unavailable",
                        code="store_unavailable", headers=retry)

    @app.exception_handler(BrokerUnavailable)
    async def _broker(_: Request, exc: BrokerUnavailable) -> JSONResponse:
        log.warning("broker unavailable: %s", exc)
        return envelope(503, "The request log is unavailable; retry later.", type_="service_unavailable",
                        code="broker_unavailable", headers=retry)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_response(list(exc.errors()))

    @app.exception_handler(ValidationError)
    async def _validation(_: Request, exc: ValidationError) -> JSONResponse:
        return validation_response(list(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code, type_ = _HTTP_CODES.get(exc.status_code, ("http_error", "invalid_request_error"))
        return envelope(exc.status_code, str(exc.detail), type_=type_, code=code)

    @app.exception_handler(ClientDisconnect)
    async def _gone(_: Request, exc: ClientDisconnect) -> Response:
        return Response(status_code=499)  # the client left mid-request: nothing to answer, nothing to log

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return envelope(500, "Internal error; it has been logged.", type_="server_error", code="internal_error")
