"""What a generation lease says, as plain values (no Redis here): the dispatch core reads these, and
``inferlog.hot.Leases`` stores them."""

from __future__ import annotations

import enum


class LeaseState(enum.Enum):
    """What a lease key says about its request."""

    FREE = "free"
    """No lease: nobody is generating it (or its holder stopped renewing)."""
    LIVE = "live"
    """A worker is generating it now and renewing the lease."""
    DONE = "done"
    """A worker's result is on the results log; the lease stays until the result-store has recorded it."""


class Renewal(enum.IntEnum):
    """The outcome of renewing one held lease."""

    LOST = 0
    """Another attempt holds it: this attempt must stop and publish nothing."""
    RENEWED = 1
    RETAKEN = 2
    """It had lapsed (Redis unreachable for longer than its TTL) and nobody took it: it is ours again."""
