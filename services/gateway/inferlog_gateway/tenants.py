"""Optional API keys: ``Authorization: Bearer <key>`` maps to a tenant. With no keys configured every
caller is the one anonymous tenant (None); with keys configured, no valid key is 401."""

from __future__ import annotations

from fastapi import Request

from inferlog.errors import InvalidRequest


class Unauthorized(InvalidRequest):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class TenantKeys:
    def __init__(self, keys: dict[str, str]) -> None:
        self._keys = dict(keys)

    def tenant_of(self, request: Request) -> str | None:
        if not self._keys:
            return None
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise Unauthorized("Missing API key: send Authorization: Bearer <key>.")
        tenant = self._keys.get(key.strip())
        if tenant is None:
            raise Unauthorized("Invalid API key.")
        return tenant
