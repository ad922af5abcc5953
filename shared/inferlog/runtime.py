"""Process plumbing shared by the services: logging and graceful-stop signals."""

from __future__ import annotations

import asyncio
import logging
import os
import signal


def configure_logging(service: str) -> None:
    level = os.environ.get("INFERLOG_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format=f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.WARNING)


def stop_on_signals() -> asyncio.Event:
    """An event set on SIGTERM or SIGINT, so a service finishes its batch and commits before exiting."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop
