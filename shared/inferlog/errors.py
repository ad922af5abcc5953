"""One error hierarchy for inferlog.

    InferlogError
    ├── ConfigError            a setting or the environment is wrong: fail at boot, say what to change
    ├── RetryableError         transient: wait and try again, commit nothing meanwhile
    │   ├── StoreUnavailable   Postgres or Redis did not answer
    │   │   └── SideChannelUnavailable  Redis (leases, cancel flags, deltas, load) did not answer
    │   └── BrokerUnavailable  the broker did not acknowledge in time
    └── InvalidRequest         the input can never succeed: 4xx at the gateway, a failed result on a topic
        ├── UnknownModel       404
        │   └── ModelNotReady  404: registered, but its files cannot be read here (not prepared)
        ├── IdempotencyConflict 422: same request ID, other payload
        └── NotFound           404

Library errors (asyncpg, redis, aiokafka) are translated at the boundary into these, so they never leak
into HTTP responses.
"""

from __future__ import annotations


class InferlogError(Exception):
    """Base of every error inferlog raises on purpose."""


class ConfigError(InferlogError):
    """The configuration or environment cannot work; the message says what to change."""


class RetryableError(InferlogError):
    """A transient failure: the same call may succeed later."""


class StoreUnavailable(RetryableError):
    """Postgres or Redis did not answer."""


class SideChannelUnavailable(StoreUnavailable):
    """Redis did not answer: a side channel (leases, cancel flags, deltas, load) is unknown for now. Redis
    is AP: callers fall back (the terminal check, polling), and never read this as an absence."""


class BrokerUnavailable(RetryableError):
    """The broker did not acknowledge in time."""


class InvalidRequest(InferlogError):
    """Input that can never succeed, with the offending parameter named."""

    status_code = 400
    error_type = "invalid_request_error"
    code: str | None = "invalid_value"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class UnknownModel(InvalidRequest):
    status_code = 404
    code = "model_not_found"


class ModelNotReady(UnknownModel):
    """A registered model whose files this process cannot read (not prepared, or broken): no request for it
    can be served here until an operator prepares it. Never a 5xx, never a crash loop."""

    code = "model_not_ready"


class NotFound(InvalidRequest):
    status_code = 404
    code = "not_found"


class IdempotencyConflict(InvalidRequest):
    status_code = 422
    code = "idempotency_key_reused"
