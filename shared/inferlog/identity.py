"""A job's identity: the key every stage uses for one job, derived from (tenant, client request ID).

Clients name their jobs (``request_id``, the ``Idempotency-Key`` header, a direct record's
``request_id``); those names are only unique within a tenant. Everything that keys a job — ledger and
result rows, Kafka record keys, leases, cancel flags, hot status, delta streams, dead letters — uses the
job key instead, so two tenants' ``x`` are two jobs and neither can reach the other's.

    job_key(None, "x")     == "x"                 the default tenant (no API keys): unchanged
    job_key(None, "a/b")   == "/a/b"              a default-tenant ID with a slash (direct producers)
    job_key("acme", "x")   == "acme/x"            a tenant whose name is a plain token
    job_key("a b/c", "x")  == "#3f1c…e2/x"        any other tenant name: a digest of it

The part before a key's first ``/`` names the tenant: empty for the default tenant's slashed IDs, a plain
name (no ``/``, never starting with ``#``) or ``#`` and a digest; a key with no ``/`` is the default
tenant's. So no two (tenant, ID) pairs share a key. Responses and URLs show the client's own ID, never
the key.
"""

from __future__ import annotations

import hashlib
import re

CLIENT_ID_PATTERN = r"^[A-Za-z0-9._:~-]{1,128}$"
"""What a client's request ID may be (the Idempotency-Key alphabet, no ``/``)."""
_PLAIN_TENANT = re.compile(r"^[A-Za-z0-9._:~-]{1,64}$")
_CLIENT_ID = re.compile(CLIENT_ID_PATTERN)
MAX_JOB_KEY_LEN = 64 + 1 + 128
"""The longest key: a plain tenant name, ``/``, the longest client ID."""


def job_key(tenant: str | None, client_id: str) -> str:
    """The key of the job ``client_id`` of ``tenant`` (``None``: the default tenant)."""
    if tenant is None:
        return f"/{client_id}" if "/" in client_id else client_id
    if _PLAIN_TENANT.fullmatch(tenant):  # (not match: "$" would let a trailing newline through)
        return f"{tenant}/{client_id}"
    return f"#{hashlib.sha256(tenant.encode('utf-8', 'surrogatepass')).hexdigest()[:24]}/{client_id}"


def client_id_of(key: str) -> str:
    """The client's own ID inside a job key."""
    return key.partition("/")[2] if "/" in key else key


def sibling_key(key: str, client_id: str) -> str:
    """The key of the job ``client_id`` in the tenant of job key ``key`` (the inverse of ``client_id_of``:
    the tenant part is kept as it is, a digest included)."""
    return f"{key.partition('/')[0]}/{client_id}" if "/" in key else client_id


def is_client_id(value: str) -> bool:
    """Whether ``value`` may be a client's request ID."""
    return bool(_CLIENT_ID.fullmatch(value))
