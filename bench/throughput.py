"""Decode throughput through the whole mesh (gateway -> router -> worker) against plain `transformers`.

Runs both in one process on the built-in model and prints tokens/s and their ratio:
    python bench/throughput.py [--concurrency 16] [--max-tokens 64]
The baseline is a naive server: `model.generate` one request at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import torch
from transformers import AutoModelForCausalLM

from meshserve.common.channels import aio_channel, aio_wait_until_serving
from meshserve.common.config import GatewayConfig, RouterConfig, WorkerConfig
from meshserve.gateway.server import start_gateway
from meshserve.router.server import start_router
from meshserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from meshserve.worker.builtin_model import ensure_builtin_model
from meshserve.worker.server import start_worker

PROMPT = "Once upon a time, in a city by the sea, there lived a small robot"


async def mesh_tokens_per_second(concurrency: int, max_tokens: int, threads: int) -> float:
    host = "127.0.0.1"
    worker = await start_worker(WorkerConfig(host=host, port=0, max_num_seqs=concurrency, threads=threads))
    router = await start_router(RouterConfig(host=host, port=0, workers=worker.address))
    # n = 1 only: the aggregator is not on this path.
    gateway = await start_gateway(
        GatewayConfig(host=host, port=0, http_port=-1, router=router.address, aggregator="127.0.0.1:1")
    )
    channel = aio_channel(gateway.address)
    stub = inference_pb2_grpc.InferenceStub(channel)
    try:
        if not await aio_wait_until_serving(gateway.address, timeout=60):
            raise SystemExit("the gateway never became ready")
        sampling = common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)

        async def one() -> int:
            call = stub.GenerateStream(inference_pb2.GenerateRequest(prompt=PROMPT, sampling=sampling))
            return sum([len(chunk.token_ids) async for chunk in call])

        await one()  # warm-up
        start = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one() for _ in range(concurrency))))
        return tokens / (time.perf_counter() - start)
    finally:
        await channel.close()
        for server in (gateway, router, worker):
            await server.stop(0)


def baseline_tokens_per_second(requests: int, max_tokens: int, threads: int) -> float:
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(ensure_builtin_model()).eval()
    from meshserve.common.tokenizer import ModelTokenizer

    ids = torch.tensor([ModelTokenizer.from_dir(ensure_builtin_model()).encode(PROMPT)])
    generate = {"max_new_tokens": max_tokens, "min_new_tokens": max_tokens, "do_sample": False}
    with torch.inference_mode():
        model.generate(ids, **generate)  # warm-up
        start = time.perf_counter()
        tokens = sum(model.generate(ids, **generate).shape[1] - ids.shape[1] for _ in range(requests))
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both (default 1)")
    args = parser.parse_args()
    mesh = asyncio.run(mesh_tokens_per_second(args.concurrency, args.max_tokens, args.threads))
    baseline = baseline_tokens_per_second(args.concurrency, args.max_tokens, args.threads)
    print(f"mesh, {args.concurrency} concurrent streams: {mesh:8.0f} tokens/s")
    print(f"transformers generate, one at a time: {baseline:8.0f} tokens/s")
    print(f"ratio mesh / baseline: {mesh / baseline:.2f}x")


if __name__ == "__main__":
    main()
