"""`meshserve soak`: the command line over soak.run_soak. Registered by meshserve.cli.main (add_parser); parsing
imports nothing heavy. Its own subcommand, not a `bench` flag: it starts the mesh it loads, so none of bench's
target flags apply, and its fault flags mean nothing to bench."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

from meshserve.loadgen.cli import EXIT_UNREACHABLE, _checked, _not_negative, _positive, _unwritable
from meshserve.loadgen.workload import parse_length


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    soak = subparsers.add_parser(
        "soak",
        help="start a mesh of its own, load it while killing and freezing its services, and check every output",
        description="Runs `meshserve up` as a child (its own ports, state file and logs), takes each prompt's "
        "greedy reference on the quiet mesh, then loads it for --duration seconds while SIGKILLing a worker "
        "every --kill-worker-every seconds, a router once and SIGSTOPping a worker once. Exits 0 when every "
        "request completed with its reference tokens or failed retryably and every service came back.",
    )
    number, whole = _checked(_positive(float)), _checked(_positive(int))
    never = _checked(_not_negative)
    soak.add_argument("--workers", type=whole, default=3, help="worker processes (default 3)")
    soak.add_argument("--routers", type=whole, default=2, help="router processes (default 2)")
    soak.add_argument("--duration", metavar="S", type=number, default=120.0, help="seconds of load (default 120)")
    soak.add_argument("--concurrency", metavar="N", type=whole, default=6, help="closed-loop streams (default 6)")
    soak.add_argument("--prompts", metavar="N", type=whole, default=16, help="the prompt pool's size (default 16)")
    for flag in ("--prompt-tokens", "--output-tokens"):
        soak.add_argument(flag, type=_checked(parse_length), default=parse_length("32"),
                          metavar="N|uniform:A-B|normal:M,SD", help="default 32")  # fmt: skip
    soak.add_argument("--kill-worker-every", metavar="S", type=never, default=10.0,
                      help="SIGKILL a random worker every S seconds (default 10; 0: never)")  # fmt: skip
    soak.add_argument(
        "--kill-router-at",
        metavar="S",
        type=never,
        default=None,
        help="SIGKILL a random router once, S seconds into the load (default: at 40%%; 0: never)",
    )
    soak.add_argument(
        "--freeze-worker-at",
        metavar="S",
        type=never,
        default=None,
        help="SIGSTOP a random worker S seconds into the load (default: at 60%%; 0: never)",
    )
    soak.add_argument("--freeze-seconds", metavar="S", type=number, default=6.0,
                      help="then SIGCONT it this much later (default 6)")  # fmt: skip
    soak.add_argument("--seed", type=int, default=0, help="the same seed: the same prompts and the same victims")
    soak.add_argument("--timeout", metavar="S", type=number, default=60.0, help="seconds per request (default 60)")
    soak.add_argument(
        "--settle-timeout",
        metavar="S",
        type=number,
        default=120.0,
        help="seconds every service gets to be back and SERVING after the load (default 120)",
    )
    soak.add_argument("--start-timeout", metavar="S", type=number, default=300.0, help="for the mesh to come up")
    soak.add_argument("--model", default="", help="Hugging Face model directory (default: the built-in model)")
    soak.add_argument(
        "--dtype",
        default="float32",
        help="the workers' dtype (default float32: only it resumes exactly; README: exactness)",
    )
    soak.add_argument(
        "--work-dir",
        metavar="DIR",
        type=Path,
        help="the mesh's logs and state file (default: a new folder under the system's temp)",
    )
    soak.add_argument("--json", metavar="FILE", type=Path, help="write the report and every request's record here")
    soak.set_defaults(run=run)
    return soak


def run(args: argparse.Namespace) -> int:
    """0 when the soak passed, 1 when it found a problem, 3 when it could not run."""
    import tempfile

    from meshserve.cli.launcher import MAX_ROUTERS
    from meshserve.loadgen.report import write_json
    from meshserve.loadgen.soak import SoakError, SoakSettings, run_soak

    problem = _unwritable(argparse.Namespace(json=args.json, plot=None))
    if args.routers > MAX_ROUTERS:
        problem = f"--routers must be from 1 to {MAX_ROUTERS}"
    if problem:
        print(f"meshserve soak: {problem}", file=sys.stderr)
        return 2
    settings = SoakSettings(
        workers=args.workers,
        routers=args.routers,
        duration=args.duration,
        concurrency=args.concurrency,
        prompts=args.prompts,
        prompt_tokens=args.prompt_tokens,
        output_tokens=args.output_tokens,
        kill_worker_every=args.kill_worker_every,
        kill_router_at=0.4 * args.duration if args.kill_router_at is None else args.kill_router_at,
        freeze_worker_at=0.6 * args.duration if args.freeze_worker_at is None else args.freeze_worker_at,
        freeze_seconds=args.freeze_seconds,
        seed=args.seed,
        timeout=args.timeout,
        settle_timeout=args.settle_timeout,
        start_timeout=args.start_timeout,
        model=args.model,
        dtype=args.dtype,
    )
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="meshserve-soak-"))
    # SIGTERM as Ctrl-C: the soak stops its mesh (and thaws a frozen worker) before it exits.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        report = run_soak(settings, work_dir, lambda line: print(line, flush=True))
    except SoakError as exc:
        print(f"meshserve soak: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        print("\nmeshserve soak: interrupted (the mesh is stopped)", file=sys.stderr)
        return 130
    for line in report.lines():
        print(line)
    if args.json:
        write_json(args.json, report.to_json())
        print(f"wrote {args.json}")
    return 0 if report.passed else 1
