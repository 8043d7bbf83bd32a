"""meshserve against vLLM's CPU build, end to end over the OpenAI HTTP API, in one run on the built-in model.

Starts `meshserve up` (its own process group, free loopback ports), loads it, stops it; then vLLM's OpenAI server
(../shared/TOOLCHAIN.md's recipe, --dtype bfloat16), the same; never both at once. With --repeats N the order
alternates (mesh, vLLM, vLLM, mesh, ...): this machine's speed drifts, so only ratios from one run mean something.

Load: streaming /v1/completions, a unique prompt per request (no prefix to share), greedy, 64 tokens, ignore_eos;
per level of --streams, that many closed-loop streams until --seconds have passed or --max-requests were sent
(in-flight ones finish). Per level: output tok/s, TTFT p50, ITL p50 (gap between SSE chunks as they arrive:
meshserve may put several tokens in one, and chunks flushed together count as 0), TPOT p50 ((last - first chunk)
/ (tokens - 1), the per-token figure to compare), E2E p50 (send to end of stream), and the CPU cores the server's
process tree and the client used.

Usage:
    python bench/peer.py --vllm-python /work/vllm-venv/bin/python            # or VLLM_PYTHON=... in the env
    python bench/peer.py --streams 1,4 --seconds 5                             # a short trial
    python bench/peer.py --repeats 3 --mesh-env threads=2 --mesh-arg=--max-num-seqs=32
    python bench/peer.py --contenders meshserve                               # one side only

--mesh-arg is a flag for `meshserve up` (--max-num-seqs, --workers, ...; it passes no other flag to workers), so
--mesh-env NAME=VALUE (MESHSERVE_NAME for every service) sets worker-only ones: threads, dtype, kernels, ...
--vllm-arg is a flag for vLLM's api_server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import aiohttp
from processes import HOST, free_port_block, spawn, stop_process_group, tree_cpu_seconds

from meshserve.common.config import WORKER_METRICS_OFFSET
from meshserve.worker.builtin_model import ensure_builtin_model

VLLM_ENV = (
    f"VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE=2 VLLM_HOST_IP={HOST} "
    "VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 HF_HUB_OFFLINE=1"
)
WORDS = (
    "river stone lantern harbor quiet market winter orchard signal copper meadow thunder paper garden engine "
    "silver candle bridge forest window valley rocket marble ocean whisper tower saddle violin desert island"
).split()


@dataclass
class RequestResult:
    ttft: float  # seconds from sending to the first chunk with a choice
    chunk_gaps: list[float]  # seconds between successive chunks with a choice
    tpot: float | None  # (last chunk - first chunk) / (tokens - 1); None with one token
    tokens: int  # usage.completion_tokens
    prompt_tokens: int
    e2e: float  # seconds from sending to the end of the stream


@dataclass
class LevelResult:
    contender: str
    streams: int
    repeat: int
    wall: float = 0.0
    tokens: int = 0
    requests: int = 0
    errors: list[str] = field(default_factory=list)
    ttft_p50: float = float("nan")
    itl_p50: float = float("nan")
    tpot_p50: float = float("nan")
    e2e_p50: float = float("nan")
    e2e_max: float = float("nan")
    server_cpu: float = float("nan")  # cores: CPU seconds of the server's process tree / wall
    client_cpu: float = float("nan")
    prompt_tokens: float = float("nan")  # median per request

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.wall if self.wall > 0 else float("nan")


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    url: str
    log: Path
    model: str = ""


def start_meshserve(model_dir: Path, work: Path, args: argparse.Namespace, name: str = "meshserve") -> Server:
    base = free_port_block(WORKER_METRICS_OFFSET + 40)
    ports = {"--port": base, "--router-port": base + 1, "--aggregator-port": base + 2, "--http-port": base + 3}
    ports |= {"--worker-port": base + 4, "--metrics-port": base + 30}  # workers count up from +4 (<= 26 of them)
    env = {**os.environ, "MESHSERVE_CACHE": str(work / "mesh-cache")}  # its own mesh.json and logs
    env |= {f"MESHSERVE_{k.upper().replace('-', '_')}": v for k, _, v in (e.partition("=") for e in args.mesh_env)}
    env |= getattr(args, "variant_env", {})
    command = [sys.executable, "-m", "meshserve.cli", "up", "--model", str(model_dir), "--host", HOST]
    command += [str(x) for flag, port in ports.items() for x in (flag, port)]
    command += ["--log-dir", str(work / "mesh-logs"), *args.mesh_arg]
    return _spawn(name, command, env, f"http://{HOST}:{base + 3}", work)


def start_vllm(model_dir: Path, work: Path, args: argparse.Namespace) -> Server:
    port = free_port_block(1)
    # TOOLCHAIN.md's recipe: in-process engine (its fastest setting on 2 cores), CPU target, 2 GiB of KV cache.
    env = {**os.environ, **dict(item.split("=") for item in VLLM_ENV.split())}
    command = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
    command += ["--host", HOST, "--port", str(port), "--dtype", "bfloat16", "--max-model-len", "2048"]
    return _spawn("vllm", [*command, *args.vllm_arg], env, f"http://{HOST}:{port}", work)


def _spawn(name: str, command: list[str], env: dict[str, str], url: str, work: Path) -> Server:
    log = work / f"{name}-{time.strftime('%H%M%S')}.log"
    return Server(name, spawn(command, env, log), url, log)


async def wait_ready(server: Server, timeout: float) -> None:
    """Until /v1/models names a model (the gateway lists one only once a worker is up)."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        while time.monotonic() < deadline and server.process.poll() is None:
            try:
                async with session.get(f"{server.url}/v1/models") as response:
                    if response.status == 200 and (models := (await response.json()).get("data")):
                        server.model = models[0]["id"]
                        return
            except (aiohttp.ClientError, TimeoutError, ValueError):
                pass
            await asyncio.sleep(1.0)
    tail = "\n".join(server.log.read_text(errors="replace").splitlines()[-20:])
    raise RuntimeError(f"{server.name} was not ready after {timeout:.0f} s (see {server.log}):\n{tail}")


def unique_prompt(n: int, rng: random.Random) -> str:
    # The request number first, so no two prompts share even their first block of tokens.
    return f"{n} " + " ".join(rng.choice(WORDS) for _ in range(24))


async def one_request(session: aiohttp.ClientSession, server: Server, prompt: str, max_tokens: int) -> RequestResult:
    body = {"model": server.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    chunk_times: list[float] = []
    usage: dict[str, int] = {}
    async with session.post(f"{server.url}/v1/completions", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {(await response.text())[:200]}")
        async for raw in response.content:
            line = raw.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            event = json.loads(line[5:])
            if event.get("choices"):
                chunk_times.append(time.perf_counter())
            if event.get("usage"):
                usage = event["usage"]
    if not chunk_times:
        raise RuntimeError("the stream carried no tokens")
    tokens = usage.get("completion_tokens", len(chunk_times))
    gaps = [b - a for a, b in pairwise(chunk_times)]
    tpot = (chunk_times[-1] - chunk_times[0]) / (tokens - 1) if tokens > 1 else None
    prompt_tokens, e2e = usage.get("prompt_tokens", 0), time.perf_counter() - sent
    return RequestResult(chunk_times[0] - sent, gaps, tpot, tokens, prompt_tokens, e2e)


async def run_level(server: Server, streams: int, repeat: int, args: argparse.Namespace) -> LevelResult:
    result = LevelResult(server.name, streams, repeat)
    results: list[RequestResult] = []
    rng = random.Random(f"{streams}-{repeat}")  # the same prompts for every contender
    sent = 0
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        start = time.perf_counter()
        deadline = start + args.seconds

        async def stream() -> None:
            nonlocal sent
            while time.perf_counter() < deadline and sent < args.max_requests:
                sent += 1
                try:
                    results.append(await one_request(session, server, unique_prompt(sent, rng), args.max_tokens))
                except (aiohttp.ClientError, TimeoutError, RuntimeError, ValueError) as exc:
                    result.errors.append(f"{type(exc).__name__}: {exc}")

        server_cpu, client_cpu = tree_cpu_seconds(server.process.pid), time.process_time()
        await asyncio.gather(*(stream() for _ in range(streams)))
        result.wall = time.perf_counter() - start
        result.server_cpu = (tree_cpu_seconds(server.process.pid) - server_cpu) / result.wall
        result.client_cpu = (time.process_time() - client_cpu) / result.wall
    result.requests, result.tokens = len(results), sum(r.tokens for r in results)
    result.ttft_p50 = _median([r.ttft for r in results])
    result.itl_p50 = _median([g for r in results for g in r.chunk_gaps])
    result.tpot_p50 = _median([r.tpot for r in results if r.tpot is not None])
    result.e2e_p50, result.e2e_max = _median([r.e2e for r in results]), max((r.e2e for r in results), default=0)
    result.prompt_tokens = _median([r.prompt_tokens for r in results])
    return result


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


async def measure(server: Server, repeat: int, args: argparse.Namespace) -> list[LevelResult]:
    await wait_ready(server, args.start_timeout)
    # Warm-up: one request alone, then each level's batch once, full length (vLLM compiles for new shapes).
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=args.request_timeout)) as session:
        rng = random.Random("warm")
        for size in [1, *args.streams]:
            prompts = ["warm " + unique_prompt(i, rng) for i in range(size)]
            await asyncio.gather(*(one_request(session, server, p, args.max_tokens) for p in prompts))
    levels = []
    for streams in args.streams:
        level = await run_level(server, streams, repeat, args)
        print(
            f"  streams {streams:>3}: {level.tokens_per_second:8.1f} tok/s, TTFT {level.ttft_p50 * 1e3:.1f} ms, "
            f"slowest request {level.e2e_max:.2f} s, CPU {level.server_cpu:.2f}, {level.requests} requests, "
            f"{len(level.errors)} errors",
            flush=True,
        )
        for error in sorted(set(level.errors))[:3]:
            print(f"    error: {error}", flush=True)
        levels.append(level)
    return levels


# (heading, LevelResult attribute, scale, decimals): medians over the repeats.
COLUMNS = [("tok/s", "tokens_per_second", 1, 1), ("TTFT ms", "ttft_p50", 1e3, 1), ("ITL ms", "itl_p50", 1e3, 1)]
COLUMNS += [("TPOT ms", "tpot_p50", 1e3, 1), ("E2E ms", "e2e_p50", 1e3, 0), ("srv CPU", "server_cpu", 1, 2)]
COLUMNS += [("cli CPU", "client_cpu", 1, 2), ("prompt", "prompt_tokens", 1, 1)]


def report(results: list[LevelResult], args: argparse.Namespace) -> None:
    print(f"\nmedians over {args.repeats} repeat(s); {args.max_tokens} output tokens per request, greedy, ignore_eos")
    header = f"{'server':<10}{'streams':>8}" + "".join(f"{h:>9}" for h, *_ in COLUMNS) + f"{'reqs':>6}{'errs':>6}"
    print(header + "\n" + "-" * len(header))
    for name in args.contenders:
        for streams in args.streams:
            levels = [r for r in results if (r.contender, r.streams) == (name, streams)]
            row = f"{name:<10}{streams:>8}"
            for _, attr, scale, decimals in COLUMNS:
                row += f"{_median([getattr(lv, attr) for lv in levels]) * scale:>9.{decimals}f}"
            print(row + f"{sum(lv.requests for lv in levels):>6}{sum(len(lv.errors) for lv in levels):>6}")
    if "vllm" not in args.contenders:
        return
    by_key = {(r.contender, r.streams, r.repeat): r for r in results}
    for name in (c for c in args.contenders if c != "vllm"):
        print(f"\n{name} / vLLM per level (each repeat's pair; median first): >1 tok/s is better, <1 TTFT is better")
        for streams in args.streams:
            pairs = [
                (by_key[(name, streams, r)], by_key[("vllm", streams, r)])
                for r in range(args.repeats)
                if (name, streams, r) in by_key and ("vllm", streams, r) in by_key
            ]
            if not pairs:
                continue
            line = f"  streams {streams:>3}:"
            for label, attr in (("tok/s", "tokens_per_second"), ("TTFT", "ttft_p50"), ("CPU", "server_cpu")):
                ratios = [getattr(m, attr) / getattr(v, attr) for m, v in pairs]
                line += f"   {label} x{statistics.median(ratios):.2f} [{' '.join(f'{r:.2f}' for r in ratios)}]"
            print(line)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", default="1,16,32", help="concurrent closed-loop streams per level")
    parser.add_argument("--seconds", type=float, default=20.0, help="each level sends new requests this long")
    parser.add_argument("--max-requests", type=int, default=2000, help="and at most this many per level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="rounds; the contenders' order alternates")
    parser.add_argument("--contenders", default="meshserve,vllm", help="meshserve,vllm or either alone")
    parser.add_argument("--vllm-python", default=os.environ.get("VLLM_PYTHON", ""), help="[env VLLM_PYTHON]")
    parser.add_argument("--mesh-arg", action="append", default=[], help="flag for `meshserve up` (repeatable)")
    parser.add_argument("--mesh-env", action="append", default=[], help="NAME=VALUE: MESHSERVE_NAME (repeatable)")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help='NAME="[VAR=VALUE ...] FLAGS": a contender NAME, `meshserve up` with this environment and these flags '
        'too (e.g. two="--workers 2", t2="MESHSERVE_THREADS=2")',
    )
    parser.add_argument("--vllm-arg", action="append", default=[], help="flag for vLLM's api_server (repeatable)")
    parser.add_argument("--start-timeout", type=float, default=300.0)
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument("--json", default="", help="also write every level's numbers to this file")
    args = parser.parse_args(argv)
    args.streams = list(dict.fromkeys(int(s) for s in args.streams.split(",") if s))
    args.contenders = [c for c in args.contenders.split(",") if c]
    # A variant's words before its first flag are VAR=VALUE environment variables, as in a shell.
    args.variants = {}
    for variant in args.variant:
        name, _, spec = variant.partition("=")
        words = spec.split()
        first_flag = next((i for i, word in enumerate(words) if word.startswith("-")), len(words))
        if not name or any("=" not in word for word in words[:first_flag]):
            parser.error(f'--variant {variant!r}: give NAME="[VAR=VALUE ...] FLAGS"')
        args.variants[name] = (dict(word.split("=", 1) for word in words[:first_flag]), words[first_flag:])
    if not args.streams or min(args.streams) < 1 or not set(args.contenders) <= {"meshserve", "vllm", *args.variants}:
        parser.error("--streams needs positive integers, --contenders meshserve, vllm and/or a --variant's name")
    if "vllm" in args.contenders and not Path(args.vllm_python).is_file():
        parser.error("give vLLM's Python with --vllm-python or $VLLM_PYTHON (see ../shared/TOOLCHAIN.md)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the servers' process groups are stopped in `finally`.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    model_dir = ensure_builtin_model()
    work = Path(tempfile.mkdtemp(prefix="meshserve-peer-"))
    print(f"model {model_dir}; logs in {work}; {os.cpu_count()} CPUs", flush=True)
    starters = {"meshserve": start_meshserve, "vllm": start_vllm}
    results: list[LevelResult] = []
    for repeat in range(args.repeats):
        order = args.contenders if repeat % 2 == 0 else args.contenders[::-1]
        for name in order:
            print(f"repeat {repeat + 1}/{args.repeats}: {name}", flush=True)
            if name in args.variants:
                variant_env, flags = args.variants[name]
                variant = argparse.Namespace(
                    **{**vars(args), "mesh_arg": [*args.mesh_arg, *flags], "variant_env": variant_env}
                )
                server = start_meshserve(model_dir, work, variant, name)
            else:
                server = starters[name](model_dir, work, args)
            try:
                results += asyncio.run(measure(server, repeat, args))
            finally:
                stop_process_group(server.process)
    report(results, args)
    if args.json:
        rows = [{**vars(r), "tokens_per_second": r.tokens_per_second, "errors": len(r.errors)} for r in results]
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0 if not any(r.errors for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
