"""Fan-out through the aggregator against the same sub-requests sent one by one, with 1, 2 and 3 workers, in one run.

    python bench/aggregator.py [--workers 1,2,3] [--batch 16] [--max-tokens 64] [--context-multiple 8]

Workers are separate processes (`meshserve worker`, one torch thread each, prefix caching off so no
run is helped by an earlier one's cache); the router and the aggregator run in this process, as in
bench/router.py. For each worker count it times:

1. a batch of `--batch` different prompts (greedy, `--max-tokens` each) as one aggregator request,
   and the same token requests sent to the router one after another;
2. a map-reduce job over a text `--context-multiple` times the model's context (default
   summarisation templates, 32-token map outputs, 64-token reduce), and the same map prompts
   (planned by the aggregator's own code) sent one after another, then the reduce.

It prints wall times and the speed-up of the fan-out over one by one.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import subprocess
import sys
import time
from pathlib import Path

from meshserve.aggregator.mapreduce import plan_map_reduce
from meshserve.aggregator.server import start_aggregator
from meshserve.cli.launcher import child_env
from meshserve.common.channels import aio_channel, aio_wait_until_serving
from meshserve.common.config import AggregatorConfig, RouterConfig
from meshserve.common.tokenizer import ModelTokenizer
from meshserve.router.server import start_router
from meshserve.v1 import aggregator_pb2, aggregator_pb2_grpc, common_pb2, router_pb2, router_pb2_grpc
from meshserve.worker.builtin_model import ensure_builtin_model

# Ports and process handling as the tests do them, from the one support module.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from support import free_ports, stop_processes

CONTEXT = 2048  # the built-in model's
MAP_TOKENS = 32
REDUCE_TOKENS = 64
WORDS = (
    "the river mesh worker router token stream engine batch cache model prompt signal harbor lantern quiet "
    "valley morning copper garden under over through bright slow city market evening station window"
).split()


def long_text(tokenizer: ModelTokenizer, tokens: int, seed: int) -> str:
    rng = random.Random(seed)
    paragraphs: list[str] = []
    total = 0
    while total < tokens:
        sentences = [
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 18))).capitalize() + "."
            for _ in range(rng.randint(3, 8))
        ]
        paragraphs.append(" ".join(sentences))
        total += len(tokenizer.encode(paragraphs[-1], add_special_tokens=False)) + 1
    return "\n\n".join(paragraphs)


def greedy(max_tokens: int) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


async def drain(call) -> int:
    """Messages of a stream, read to the end."""
    count = 0
    async for _ in call:
        count += 1
    return count


async def one_by_one(router: router_pb2_grpc.RouterStub, requests: list[common_pb2.TokenRequest]) -> list[str]:
    texts = []
    for request in requests:
        texts.append("".join([chunk.text async for chunk in router.Generate(request, timeout=600)]))
    return texts


async def timed(coroutine) -> tuple[float, object]:
    start = time.perf_counter()
    result = await coroutine
    return time.perf_counter() - start, result


async def bench_workers(
    addresses: list[str], tokenizer: ModelTokenizer, args: argparse.Namespace, run: int
) -> tuple[float, float, float, float, int]:
    router_server = await start_router(RouterConfig(host="127.0.0.1", port=0, workers=",".join(addresses)))
    aggregator_server = await start_aggregator(AggregatorConfig(host="127.0.0.1", port=0, router=router_server.address))
    channels = [aio_channel(router_server.address), aio_channel(aggregator_server.address)]
    try:
        router = router_pb2_grpc.RouterStub(channels[0])
        aggregator = aggregator_pb2_grpc.AggregatorStub(channels[1])
        for _ in range(600):
            stats = await router.Stats(router_pb2.RouterStatsRequest(), timeout=5)
            if sum(w.up for w in stats.workers) == len(addresses):
                break
            await asyncio.sleep(0.05)
        else:
            raise SystemExit(f"the router never saw its {len(addresses)} workers up")
        rng = random.Random(run)
        parent = common_pb2.TokenRequest(model="meshserve-tiny", sampling=greedy(args.max_tokens))
        warm = aggregator_pb2.FanOutRequest(request=parent, n=len(addresses) * 2)
        warm.request.prompt_token_ids.extend([5, 6, 7])
        warm.request.sampling.max_tokens = 4
        await drain(aggregator.Generate(warm, timeout=600))

        prompts = [
            [rng.randrange(3, tokenizer.vocab_size) for _ in range(rng.randint(20, 60))] for _ in range(args.batch)
        ]
        batch = aggregator_pb2.FanOutRequest(
            request=common_pb2.TokenRequest(
                request_id=f"batch{run}", model="meshserve-tiny", sampling=greedy(args.max_tokens)
            ),
            inputs=[aggregator_pb2.FanOutInput(prompt_token_ids=p) for p in prompts],
        )
        batch_fanned, _ = await timed(drain(aggregator.Generate(batch, timeout=600)))
        singles = [
            common_pb2.TokenRequest(
                request_id=f"single{i}", model="meshserve-tiny", prompt_token_ids=p, sampling=greedy(args.max_tokens)
            )
            for i, p in enumerate(prompts)
        ]
        batch_serial, _ = await timed(one_by_one(router, singles))

        text = long_text(tokenizer, args.context_multiple * CONTEXT, seed=run)
        job = aggregator_pb2.FanOutRequest(
            request=common_pb2.TokenRequest(
                request_id=f"mapreduce{run}", model="meshserve-tiny", sampling=greedy(REDUCE_TOKENS)
            ),
            map_reduce=aggregator_pb2.MapReduceTask(text=text, map_sampling=greedy(MAP_TOKENS)),
        )
        map_reduce_fanned, _ = await timed(drain(aggregator.Generate(job, timeout=600)))
        plan = plan_map_reduce(text, "", "", 0, greedy(MAP_TOKENS), REDUCE_TOKENS, tokenizer, CONTEXT, max_chunks=1024)
        maps = [
            common_pb2.TokenRequest(
                model="meshserve-tiny",
                prompt_token_ids=tokenizer.encode(plan.map_prompt(c)),
                sampling=plan.map_sampling,
            )
            for c in plan.chunks
        ]

        async def serial_map_reduce() -> None:
            outputs = await one_by_one(router, maps)
            reduce = common_pb2.TokenRequest(
                model="meshserve-tiny",
                prompt_token_ids=tokenizer.encode(plan.reduce_prompt(outputs)),
                sampling=greedy(REDUCE_TOKENS),
            )
            await one_by_one(router, [reduce])

        map_reduce_serial, _ = await timed(serial_map_reduce())
        return batch_fanned, batch_serial, map_reduce_fanned, map_reduce_serial, len(plan.chunks)
    finally:
        for channel in channels:
            await channel.close()
        await aggregator_server.stop(0)
        await router_server.stop(0)


async def compare(addresses: list[str], counts: list[int], tokenizer: ModelTokenizer, args: argparse.Namespace) -> None:
    for address in addresses:
        if not await aio_wait_until_serving(address, timeout=300):
            raise SystemExit(f"worker {address} never became ready")
    print(
        f"{args.batch}-prompt batch x {args.max_tokens} tokens; map-reduce over {args.context_multiple}x the "
        f"context ({args.context_multiple * CONTEXT} tokens), {MAP_TOKENS}-token maps, {REDUCE_TOKENS}-token reduce"
    )
    print("workers  batch: fan-out  one by one  speed-up   map-reduce: chunks  fan-out  one by one  speed-up")
    for run, count in enumerate(counts):
        batch_fanned, batch_serial, mr_fanned, mr_serial, chunks = await bench_workers(
            addresses[:count], tokenizer, args, run
        )
        print(
            f"{count:>7}  {batch_fanned:>13.2f}s {batch_serial:>10.2f}s {batch_serial / batch_fanned:>8.2f}x"
            f"  {chunks:>18}  {mr_fanned:>6.2f}s {mr_serial:>10.2f}s {mr_serial / mr_fanned:>8.2f}x",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1,2,3", help="worker counts to compare")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--context-multiple", type=int, default=8)
    args = parser.parse_args()
    counts = [int(c) for c in args.workers.split(",")]
    tokenizer = ModelTokenizer.from_dir(ensure_builtin_model())
    ports = free_ports(max(counts))
    worker_flags = ["--threads", "1", "--max-num-seqs", "16", "--prefix-caching", "false", "--metrics-port", "0"]
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "meshserve.cli",
                "worker",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                *worker_flags,
            ],
            env=child_env(),
            stderr=subprocess.DEVNULL,
        )
        for port in ports
    ]
    try:
        asyncio.run(compare([f"127.0.0.1:{p}" for p in ports], counts, tokenizer, args))
    finally:
        stop_processes(workers)


if __name__ == "__main__":
    main()
