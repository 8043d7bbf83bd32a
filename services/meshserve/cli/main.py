"""The `meshserve` command: run the mesh or one service, and talk to it."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from meshserve.common import config as cfg
from meshserve.common.enums import PRIORITY_BY_NAME
from meshserve.loadgen.cli import add_parser as add_bench_parser
from meshserve.loadgen.soak_cli import add_parser as add_soak_parser

PRIORITIES = list(PRIORITY_BY_NAME)


def main(argv: list[str] | None = None) -> int:
    from meshserve.cli.launcher import die_with_parent

    die_with_parent()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    return int(args.run(args) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshserve", description="An LLM inference-serving mesh over gRPC.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    up = commands.add_parser("up", help="run the whole mesh on this machine, one process per service")
    up.add_argument("--model", default="", help="Hugging Face model directory (default: the built-in tiny model)")
    up.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    up.add_argument("--max-num-seqs", type=int, default=32, help="sequences each worker decodes together")
    up.add_argument("--host", default=cfg.DEFAULT_HOST, help="address every service listens on")
    up.add_argument("--port", type=int, default=cfg.GATEWAY_PORT, help="the gateway's gRPC port")
    up.add_argument("--routers", type=int, default=1, help="router processes (default 1), each used by the gateway")
    up.add_argument(
        "--router-port", type=int, default=cfg.ROUTER_PORT, help="the first router's port; the rest are 100 apart"
    )
    up.add_argument("--aggregator-port", type=int, default=cfg.AGGREGATOR_PORT)
    up.add_argument(
        "--worker-port",
        type=int,
        default=cfg.FIRST_WORKER_PORT,
        help="first worker's port; the rest count up",
    )
    up.add_argument(
        "--metrics-port",
        type=int,
        default=cfg.GATEWAY_METRICS_PORT,
        help=(
            "the gateway's Prometheus /metrics port; router +1, aggregator +2, "
            f"worker i +{cfg.WORKER_METRICS_OFFSET}+i (0: no metrics)"
        ),
    )
    up.add_argument(
        "--trace",
        choices=["none", "console", "otlp"],
        default="",
        help="trace exporter of every service (default: from the OTEL_* variables, else none)",
    )
    up.add_argument(
        "--http-port",
        type=int,
        default=cfg.GATEWAY_HTTP_PORT,
        help="the gateway's HTTP port: OpenAI-compatible API and chat page (-1: none)",
    )
    up.add_argument("--log-dir", default="", help="where each service's log goes (default: <cache>/logs)")
    up.add_argument("--start-timeout", type=float, default=300.0, help="seconds each service gets to become ready")
    up.add_argument(
        "--tls",
        action="store_true",
        help="mutual TLS between the services and TLS at the gateway, with certificates `meshserve certs` makes "
        "in <cache>/tls (kept across runs)",
    )
    up.add_argument("--insecure", action="store_true", help="serve plaintext on a --host other than loopback")
    up.set_defaults(run=_run_up)

    generate = commands.add_parser("generate", help="send a prompt to the gateway and print the answer")
    generate.add_argument("prompt")
    generate.add_argument("--max-tokens", type=int, default=None)
    generate.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    generate.add_argument("--priority", choices=PRIORITIES, default="normal")
    generate.add_argument("--n", type=int, default=1, help="completions to generate")
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--temperature", type=float, default=None)
    generate.add_argument("--top-p", type=float, default=None)
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--min-p", type=float, default=0.0)
    generate.add_argument("--repetition-penalty", type=float, default=None, help="> 1 discourages repeats")
    generate.add_argument("--presence-penalty", type=float, default=0.0)
    generate.add_argument("--frequency-penalty", type=float, default=0.0)
    generate.add_argument("--ignore-eos", action="store_true", help="go on past the end-of-sequence token")
    generate.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    generate.add_argument("--min-tokens", type=int, default=0, help="no end-of-sequence or stop before this many")
    generate.add_argument("--include-stop-str", action="store_true", help="keep the matched stop string in the text")
    generate.add_argument("--show-special-tokens", action="store_true", help="keep special tokens' text")
    generate.add_argument("--chat", action="store_true", help="send the prompt as a user message (chat template)")
    generate.add_argument("--model", default="", help="model name (default: the only one served)")
    generate.add_argument("--gateway", default=_env("GATEWAY", f"{cfg.DEFAULT_HOST}:{cfg.GATEWAY_PORT}"))
    generate.add_argument("--timeout", type=float, default=120.0, help="deadline in seconds")
    generate.add_argument("--api-key", default=_env("API_KEY", ""), help="API key of a gateway that requires one")
    generate.add_argument(
        "--tls-ca", default="", help="CA of a gateway that serves TLS (default: that of `meshserve up --tls`)"
    )
    generate.set_defaults(run=_run_generate)

    status = commands.add_parser("status", help="health of each service of the local mesh and the models served")
    status.add_argument("--gateway", default=None, help="gateway address (default: from `meshserve up`, else :50051)")
    status.add_argument("--wait", type=float, default=0.0, help="wait up to this many seconds for every service")
    status.add_argument("--api-key", default=_env("API_KEY", ""), help="API key of a gateway that requires one")
    status.add_argument("--tls-ca", default="", help="CA of a gateway that serves TLS (default: from `meshserve up`)")
    status.set_defaults(run=_run_status)

    hash_key = commands.add_parser(
        "hash-key", help="print the API-keys-file entry of a key (a new random key when none is given)"
    )
    hash_key.add_argument("key", nargs="?", default=None, help="the key; - reads it from standard input")
    hash_key.add_argument("--tenant", default="default", help="tenant name (letters, digits, . _ -)")
    hash_key.add_argument("--max-priority", choices=PRIORITIES, default="normal", help="highest priority allowed")
    hash_key.add_argument("--requests-per-second", type=float, default=0.0, help="0: unlimited")
    hash_key.add_argument("--tokens-per-minute", type=float, default=0.0, help="prompt + completion; 0: unlimited")
    hash_key.set_defaults(run=_run_hash_key)

    certs = commands.add_parser(
        "certs", help="write a development CA and a key and certificate per service (mutual TLS)"
    )
    certs.add_argument("--dir", required=True, help="folder for ca.crt and ROLE.crt/ROLE.key (a CA there is kept)")
    certs.add_argument("--fullname", default="meshserve", help="the chart's fullname, for its Service DNS names")
    certs.add_argument("--namespace", default="default", help="the release's namespace, for its Service DNS names")
    certs.add_argument("--dns-name", action="append", default=[], help="another name for every certificate")
    certs.add_argument("--days", type=int, default=365, help="validity of the service certificates")
    certs.set_defaults(run=_run_certs)

    model = commands.add_parser("builtin-model", help="create the built-in tiny model (if needed) and print its path")
    model.set_defaults(run=_run_builtin_model)

    add_bench_parser(commands)
    add_soak_parser(commands)

    for name, config_type, starter in (
        ("gateway", cfg.GatewayConfig, "meshserve.gateway.server:start_gateway"),
        ("router", cfg.RouterConfig, "meshserve.router.server:start_router"),
        ("aggregator", cfg.AggregatorConfig, "meshserve.aggregator.server:start_aggregator"),
        ("worker", cfg.WorkerConfig, "meshserve.worker.server:start_worker"),
    ):
        service = commands.add_parser(name, help=f"run the {name} service alone")
        cfg.add_arguments(service, config_type)
        service.set_defaults(run=_service_runner(name, config_type, starter))
    return parser


def _env(name: str, default: str) -> str:
    return os.environ.get(cfg.ENV_PREFIX + name, default)


def _service_runner(
    name: str, config_type: type[cfg.ServerConfig], starter: str
) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        import importlib

        from meshserve.common.logs import setup_logging
        from meshserve.common.metrics import serve_metrics
        from meshserve.common.server import serve_until_signalled
        from meshserve.common.telemetry import setup_tracing

        config = cfg.from_args(config_type, args)
        setup_logging(name, config.log_level, config.log_file)
        stop_tracing = setup_tracing(name, config.trace)
        module_name, function_name = starter.split(":")
        start: Callable[[Any], Awaitable[Any]] = getattr(importlib.import_module(module_name), function_name)

        async def serve() -> None:
            running = await start(config)
            endpoint = None
            if config.metrics_port:
                try:
                    endpoint = serve_metrics(running.metrics, config.host, config.metrics_port, lambda: running.serving)
                except SystemExit:
                    await running.stop(0)
                    raise
            try:
                await serve_until_signalled(running, name, config.drain_seconds)
            finally:
                if endpoint:
                    endpoint.close()
            if running.failure:  # for its supervisor (Kubernetes, `meshserve up`) to start a new one
                raise SystemExit(f"meshserve: {name} stopped: {running.failure}")

        try:
            asyncio.run(serve())
        finally:
            stop_tracing()  # exports the spans still buffered
        return 0

    return run


def _run_up(args: argparse.Namespace) -> int:
    from meshserve.cli.launcher import run_mesh

    return run_mesh(args)


def _run_generate(args: argparse.Namespace) -> int:
    from meshserve.cli.commands import generate_command

    return generate_command(args)


def _run_status(args: argparse.Namespace) -> int:
    from meshserve.cli.commands import status_command

    return status_command(args)


def _run_hash_key(args: argparse.Namespace) -> int:
    import json
    import secrets

    from meshserve.gateway.auth import hash_key, parse_keys

    key = sys.stdin.readline().strip() if args.key == "-" else args.key
    if key is None:
        key = "ms-" + secrets.token_urlsafe(32)
        print(f"new API key (keep it now: the file holds only its hash): {key}", file=sys.stderr)
    if not key:
        print("meshserve: the key is empty", file=sys.stderr)
        return 2
    entry = {
        "name": args.tenant,
        "max_priority": args.max_priority,
        "requests_per_second": args.requests_per_second,
        "tokens_per_minute": args.tokens_per_minute,
        "key_sha256": [hash_key(key)],
    }
    try:
        parse_keys({"tenants": [entry]})
    except ValueError as exc:
        print(f"meshserve: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(entry))
    return 0


def _run_certs(args: argparse.Namespace) -> int:
    from pathlib import Path

    from meshserve.cli.certs import write_certs

    written = write_certs(
        Path(args.dir),
        fullname=args.fullname,
        namespace=args.namespace,
        extra_names=tuple(args.dns_name),
        days=args.days,
    )
    for path in written:
        print(path)
    return 0


def _run_builtin_model(args: argparse.Namespace) -> int:
    from meshserve.worker.builtin_model import ensure_builtin_model

    print(ensure_builtin_model())
    return 0
