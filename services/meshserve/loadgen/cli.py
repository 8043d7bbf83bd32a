"""`meshserve bench`: the command line over runner.run_level. Registered by meshserve.cli.main (add_parser);
parsing imports nothing heavy, so `meshserve --help` stays fast."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from meshserve.common import config as cfg
from meshserve.loadgen.levels import LoadLevel, parse_concurrencies, parse_rates
from meshserve.loadgen.workload import Workload, parse_length

DEFAULT_DURATION_S = 20.0
EXIT_UNREACHABLE = 3


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    bench = subparsers.add_parser(
        "bench",
        help="load a gateway (gRPC) or any OpenAI-compatible server and report throughput and latency",
        description="Closed-loop concurrency levels or open-loop request rates; one table row per level.",
    )
    target = bench.add_mutually_exclusive_group()
    target.add_argument(
        "--grpc",
        metavar="HOST:PORT",
        type=_checked(_address),
        help="the mesh's gRPC API (default: $MESHSERVE_GATEWAY, else 127.0.0.1:50051)",
    )
    target.add_argument(
        "--openai", metavar="URL", type=_checked(_base_url), help="an OpenAI API, e.g. http://host:8000/v1"
    )
    bench.add_argument("--api-key", default=os.environ.get(cfg.ENV_PREFIX + "API_KEY", ""), help="sent as a Bearer key")
    bench.add_argument("--model", default="", help="model name (default: the first one the server lists)")
    bench.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    load = bench.add_mutually_exclusive_group()
    load.add_argument(
        "--concurrency",
        metavar="N,N,...",
        type=_checked(parse_concurrencies),
        help="closed-loop streams per level (default 1,4,16)",
    )
    load.add_argument(
        "--rate", metavar="R,R,...", type=_checked(parse_rates), help="open-loop Poisson requests per second per level"
    )
    bench.add_argument(
        "--duration",
        metavar="S",
        type=_checked(_positive(float)),
        help=f"seconds each level sends (default {DEFAULT_DURATION_S:g})",
    )
    bench.add_argument(
        "--requests", metavar="N", type=_checked(_positive(int)), help="requests each level sends at most"
    )
    bench.add_argument(
        "--prompt-tokens",
        type=_checked(parse_length),
        default=parse_length("32"),
        metavar="N|uniform:A-B|normal:M,SD",
        help="prompt lengths (default 32)",
    )
    bench.add_argument(
        "--output-tokens",
        type=_checked(parse_length),
        default=parse_length("64"),
        metavar="N|uniform:A-B|normal:M,SD",
        help="output lengths (default 64)",
    )
    bench.add_argument(
        "--prompt-format",
        choices=["ids", "text"],
        default="ids",
        help="ids: token ids, exactly --prompt-tokens long; text: that many words (chat always sends text)",
    )
    bench.add_argument(
        "--no-ignore-eos",
        dest="ignore_eos",
        action="store_false",
        help="do not send ignore_eos (for servers that refuse it): outputs may end before --output-tokens",
    )
    bench.add_argument("--seed", type=int, default=0, help="the same seed sends the same requests")
    bench.add_argument(
        "--temperature", metavar="T", type=_checked(_not_negative), default=0.0, help="default 0: greedy"
    )
    bench.add_argument(
        "--warmup", metavar="N", type=_checked(_not_negative_int), default=1, help="requests before measuring"
    )
    bench.add_argument(
        "--timeout", metavar="S", type=_checked(_positive(float)), default=300.0, help="seconds per request"
    )
    bench.add_argument(
        "--json", metavar="FILE", type=Path, help="write every level's summary and every request's record here"
    )
    bench.add_argument(
        "--plot", metavar="FILE.png", type=Path, help="write a PNG of throughput and latency against load here"
    )
    bench.set_defaults(run=run)
    return bench


def run(args: argparse.Namespace) -> int:
    """0 when every request succeeded, 1 when some failed, 3 when the target cannot be used."""
    from meshserve.loadgen.target import TargetError

    problem = _unwritable(args)
    if problem:
        print(f"meshserve bench: {problem}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_bench(args))
    except TargetError as exc:
        print(f"meshserve bench: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        print("\nmeshserve bench: interrupted", file=sys.stderr)
        return 130


def levels_of(args: argparse.Namespace) -> list[LoadLevel]:
    duration = args.duration if args.duration is not None or args.requests is not None else DEFAULT_DURATION_S
    if args.rate:
        return [LoadLevel(rate=rate, duration=duration, requests=args.requests) for rate in args.rate]
    return [LoadLevel(concurrency=n, duration=duration, requests=args.requests) for n in args.concurrency or [1, 4, 16]]


def workload_of(args: argparse.Namespace) -> Workload:
    return Workload(
        prompt_tokens=args.prompt_tokens,
        output_tokens=args.output_tokens,
        seed=args.seed,
        temperature=args.temperature,
        endpoint=args.endpoint,
        prompt_format=args.prompt_format,
        ignore_eos=args.ignore_eos,
    )


async def _bench(args: argparse.Namespace) -> int:
    from meshserve.loadgen import report
    from meshserve.loadgen.grpc_target import GrpcTarget
    from meshserve.loadgen.openai_target import OpenAITarget
    from meshserve.loadgen.progress import LevelProgress
    from meshserve.loadgen.runner import run_level, warm_up

    options = {"api_key": args.api_key, "model": args.model, "endpoint": args.endpoint, "timeout": args.timeout}
    if args.openai:
        target: GrpcTarget | OpenAITarget = OpenAITarget(args.openai, **options)
    else:
        target = GrpcTarget(args.grpc or os.environ.get(cfg.ENV_PREFIX + "GATEWAY", _local_gateway()), **options)
    workload, levels = workload_of(args), levels_of(args)
    async with target:
        print(
            f"meshserve bench: {target.name}, model {target.model}, {args.endpoint}; prompts {workload.prompt_tokens}"
            f" tokens, outputs {workload.output_tokens}, seed {workload.seed}, temperature {workload.temperature:g}",
            flush=True,
        )
        if args.warmup:
            warm = await warm_up(target, workload, args.warmup)
            if not any(record.ok for record in warm):
                failed = warm[0]
                print(f"meshserve bench: the warm-up failed: {failed.status}: {failed.error}", file=sys.stderr)
                return 1
        print(report.table_header(), flush=True)
        results = []
        for level in levels:
            progress = LevelProgress(level)
            ticker = asyncio.create_task(progress.tick())
            try:
                result = await run_level(target, workload, level, progress.on_record)
            finally:
                ticker.cancel()
                progress.close()
            results.append(result)
            print(report.table_row(result.summary), flush=True)
    for result in results:
        for line in report.first_errors(result):
            print(f"{result.level.label}:{line}")
    if args.json:
        report.write_json(args.json, report.bench_json(target.describe(), workload.describe(), results))
        print(f"wrote {args.json}")
    if args.plot:
        from meshserve.loadgen.plot import plot_levels

        plot_levels(results, args.plot, f"{target.model} via {target.name}")
        print(f"wrote {args.plot}")
    return 1 if any(not record.ok for result in results for record in result.records) else 0


def _local_gateway() -> str:
    return f"{cfg.DEFAULT_HOST}:{cfg.GATEWAY_PORT}"


def _unwritable(args: argparse.Namespace) -> str:
    """Why an output cannot be written, found before any load is sent (not after minutes of it)."""
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path is not None and not path.resolve().parent.is_dir():
            return f"{flag} {path}: no folder {path.resolve().parent}"
    if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
        return "--plot needs matplotlib: pip install 'meshserve[bench]'"
    return ""


def _checked(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """argparse shows an ArgumentTypeError's own words (a ValueError only as 'invalid value')."""

    def check(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    check.__name__ = parse.__name__
    return check


def _positive(kind: type) -> Callable[[str], Any]:
    def positive(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        if not value > 0 or value == float("inf"):
            raise ValueError(f"must be more than 0, not {text}")
        return value

    return positive


def _not_negative(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise ValueError(f"must be 0 or more, not {text}")
    return value


def _not_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"must be 0 or more, not {text}")
    return value


def _address(text: str) -> str:
    host, colon, port = text.rpartition(":")
    if not (colon and host and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"{text!r} is not HOST:PORT")
    return text


def _base_url(text: str) -> str:
    if not text.startswith(("http://", "https://")):
        raise ValueError(f"{text!r} is not an http:// or https:// URL (e.g. http://127.0.0.1:8000/v1)")
    return text
