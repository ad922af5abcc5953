"""The ``inferlog`` command: ``up``, ``run <service>``, ``prepare``, ``migrate``, ``schemas``, ``bench``,
and the operators' ``topics``, ``replay``, ``redrive``, ``dlq`` and ``rebuild-store`` (inferlog.operate)."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import sys
from pathlib import Path
from typing import NoReturn


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own options (bench/inferlog_bench/cli.py)
        from inferlog_bench.cli import main as bench

        return bench(argv[1:])
    parser = _OneLineParser(prog="inferlog", description="LLM inference over a durable log.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)
    up = sub.add_parser("up", help="start broker (if needed), migrations, model, topics and the four services")
    up.add_argument("--host", default=None, help="gateway address (default INFERLOG_GATEWAY_HOST or 127.0.0.1)")
    up.add_argument("--port", type=int, default=None, help="gateway port (default INFERLOG_GATEWAY_PORT or 8000)")
    run = sub.add_parser("run", help="run one service in the foreground")
    run.add_argument("service", choices=list(_SERVICE_MODULES))
    sub.add_parser("prepare", help="convert every registered GGUF model into its cached HF directory")
    sub.add_parser("migrate", help="apply the database migrations")
    sub.add_parser("bench", help="every backend side by side: naive, static, direct, peer server, pipeline "
                   "(inferlog bench --help)")
    schemas = sub.add_parser("schemas", help="export the records' JSON Schema into schemas/")
    schemas.add_argument("--out", type=Path, default=Path("schemas"))
    from inferlog.operate import add_commands, run_command

    add_commands(sub)
    args = parser.parse_args(argv)

    from inferlog.runtime import configure_logging

    configure_logging(args.service if args.command == "run" else "inferlog")
    if args.command == "run":
        return _run_service(args.service)
    if args.command == "schemas":
        return _export_schemas(args.out)

    from inferlog.config import InferlogSettings

    settings = InferlogSettings()
    if hasattr(args, "operate"):
        return run_command(args, settings)
    if args.command == "up":
        from inferlog.stack import up as stack_up
        from inferlog_gateway.settings import GatewaySettings

        gateway = GatewaySettings()
        return stack_up(settings, args.host or gateway.host, args.port or gateway.port)
    if args.command == "prepare":
        from inferlog.models import ModelRegistry, prepare

        for model in ModelRegistry(settings):
            prepare(model)
            print(f"{model.name}: {model.directory} ({model.version()})")
        return 0
    if args.command == "migrate":
        from inferlog.db import migrate

        applied = asyncio.run(migrate(settings.postgres_url, settings.postgres_schema))
        print(f"applied: {applied or 'nothing (up to date)'}")
        return 0
    parser.error(f"unknown command {args.command}")
    return 2


class _OneLineParser(argparse.ArgumentParser):
    """Bad arguments are one line on stderr (``inferlog replay: error: …``) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


_SERVICE_MODULES = {
    "gateway": "inferlog_gateway.main",
    "tokenizer": "inferlog_tokenizer.main",
    "gpu-worker": "inferlog_worker.main",
    "result-store": "inferlog_store.main",
}


def _run_service(service: str) -> int:
    importlib.import_module(_SERVICE_MODULES[service]).run()
    return 0


def _export_schemas(out: Path) -> int:
    from inferlog.messages import EXPORTED_MODELS

    out.mkdir(parents=True, exist_ok=True)
    for name, model in EXPORTED_MODELS.items():
        (out / f"{name}.schema.json").write_text(json.dumps(model.model_json_schema(), indent=2) + "\n")
        print(out / f"{name}.schema.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
