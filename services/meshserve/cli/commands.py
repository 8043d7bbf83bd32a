"""The command-line client: `meshserve generate` and `meshserve status`."""

from __future__ import annotations

import argparse
import json
import sys
import time

import grpc

from meshserve.cli.launcher import state_file
from meshserve.common import config as cfg
from meshserve.common.channels import health_status, sync_channel
from meshserve.common.enums import FINISH_REASON_NAMES
from meshserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc, router_pb2, router_pb2_grpc


def build_request(args: argparse.Namespace) -> inference_pb2.GenerateRequest:
    sampling = common_pb2.SamplingParams(
        top_k=args.top_k,
        stop=args.stop,
        min_p=args.min_p,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        ignore_eos=args.ignore_eos,
        min_tokens=args.min_tokens,
        include_stop_str_in_output=args.include_stop_str,
    )
    if args.show_special_tokens:
        sampling.skip_special_tokens = False
    if args.repetition_penalty is not None:
        sampling.repetition_penalty = args.repetition_penalty
    if args.max_tokens is not None:
        sampling.max_tokens = args.max_tokens
    if args.temperature is not None:
        sampling.temperature = args.temperature
    if args.top_p is not None:
        sampling.top_p = args.top_p
    if args.seed is not None:
        sampling.seed = args.seed
    request = inference_pb2.GenerateRequest(
        model=args.model,
        sampling=sampling,
        n=args.n,
        priority=common_pb2.Priority.Value(f"PRIORITY_{args.priority.upper()}"),
    )
    if args.chat:
        request.messages.messages.add(role="user", content=args.prompt)
    else:
        request.prompt = args.prompt
    return request


def generate_command(args: argparse.Namespace) -> int:
    request = build_request(args)
    with sync_channel(args.gateway) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        try:
            if args.stream:
                _print_stream(stub.GenerateStream(request, timeout=args.timeout, metadata=_credentials(args)), args.n)
            else:
                reply = stub.Generate(request, timeout=args.timeout, metadata=_credentials(args))
                for completion in reply.completions:
                    if args.n > 1:
                        print(f"--- [{completion.index}] ({FINISH_REASON_NAMES.get(completion.finish_reason, '?')})")
                    print(completion.text)
                _print_usage(reply.usage)
        except grpc.RpcError as exc:
            return _report_error(exc, args.gateway)
        except KeyboardInterrupt:
            print("\nmeshserve: cancelled", file=sys.stderr)
            return 130
    return 0


def _credentials(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The gateway's API key as gRPC metadata (`authorization: Bearer KEY`), when one is given."""
    key = getattr(args, "api_key", "")
    return [("authorization", f"Bearer {key}")] if key else []


def _print_stream(stream: grpc.Call, n: int) -> None:
    """One completion streams as it comes; several are printed each as soon as it finishes."""
    pending: dict[int, list[str]] = {}
    for chunk in stream:
        if chunk.final:
            if n == 1:
                print()
            _print_usage(chunk.usage)
        elif n == 1:
            print(chunk.text, end="", flush=True)
        else:
            pending.setdefault(chunk.index, []).append(chunk.text)
            if chunk.finish_reason:
                reason = FINISH_REASON_NAMES.get(chunk.finish_reason, "?")
                print(f"--- [{chunk.index}] ({reason})\n{''.join(pending.pop(chunk.index))}", flush=True)


def _print_usage(usage: common_pb2.Usage) -> None:
    print(
        f"[{usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens]",
        file=sys.stderr,
    )


def _report_error(exc: grpc.RpcError, gateway: str) -> int:
    code = exc.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        print(
            f"meshserve: cannot reach the gateway at {gateway} ({exc.details()}).\n"
            "Is the mesh running? Start it with `meshserve up`, or pass --gateway ADDR.",
            file=sys.stderr,
        )
        return 3
    print(f"meshserve: {code.name}: {exc.details()}", file=sys.stderr)
    return 1


def local_mesh_services(gateway: str | None) -> list[dict]:
    """Each service (name, address, and from a running `meshserve up` its restarts and last exit), else the
    default addresses."""
    state = state_file()
    if gateway is None and state.exists():
        return json.loads(state.read_text())["services"]
    host = cfg.DEFAULT_HOST
    return [
        {"name": "worker-0", "address": f"{host}:{cfg.FIRST_WORKER_PORT}"},
        {"name": "router-0", "address": f"{host}:{cfg.ROUTER_PORT}"},
        {"name": "aggregator", "address": f"{host}:{cfg.AGGREGATOR_PORT}"},
        {"name": "gateway", "address": gateway or f"{host}:{cfg.GATEWAY_PORT}"},
    ]


def print_router_stats(address: str) -> None:
    """Queues per class and each worker's load, as the router sees them."""
    with sync_channel(address) as channel:
        stats = router_pb2_grpc.RouterStub(channel).Stats(router_pb2.RouterStatsRequest(), timeout=5)
    queues = ", ".join(
        f"{common_pb2.Priority.Name(q.priority).removeprefix('PRIORITY_').lower()} {q.queued}"
        + (f" (oldest {q.oldest_wait_ms} ms)" if q.queued else "")
        for q in stats.queues
    )
    print(f"queues       {queues}")
    print(
        f"router       dispatched {stats.dispatched}, shed {stats.shed}, "
        f"deadline exceeded {stats.deadline_exceeded}, failovers {stats.failovers}"
    )
    for worker in stats.workers:
        load = worker.load
        state = "up" if worker.up else ("draining" if worker.draining else "down")
        print(
            f"worker       {worker.address:<22} {state:<8} running {load.running_sequences}/{load.max_num_seqs}, "
            f"waiting {load.waiting_sequences}, KV blocks free {load.free_kv_blocks}/{load.total_kv_blocks}, "
            f"{load.tokens_per_second:.0f} tok/s, prefix hits {load.prefix_cache_hit_rate:.0%}"
        )


def _router_sees_workers_up(router: str) -> bool:
    with sync_channel(router) as channel:
        try:
            stats = router_pb2_grpc.RouterStub(channel).Stats(router_pb2.RouterStatsRequest(), timeout=5)
        except grpc.RpcError:
            return False
    return bool(stats.workers) and all(w.up for w in stats.workers)


def status_command(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.wait
    while True:
        services = local_mesh_services(args.gateway)
        statuses = {s["name"]: health_status(s["address"]) for s in services}
        all_serving = all(s == "SERVING" for s in statuses.values())
        routers = [s["address"] for s in services if s["name"].startswith("router")]
        # Ready means the routers have their workers' first load reports too, not only that each process serves.
        if (all_serving and all(_router_sees_workers_up(r) for r in routers)) or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    for service in services:
        line = f"{service['name']:<12} {service['address']:<22} {statuses[service['name']]}"
        if service.get("restarts"):
            line += f"  restarts {service['restarts']}, last exit: {service.get('last_exit', '')}"
        print(line)
    addresses = {s["name"]: s["address"] for s in services}
    gateway = addresses.get("gateway", args.gateway)
    if statuses.get("gateway") == "SERVING":
        with sync_channel(gateway) as channel:
            try:
                reply = inference_pb2_grpc.InferenceStub(channel).ListModels(
                    common_pb2.ListModelsRequest(names_only=True), timeout=5, metadata=_credentials(args)
                )
            except grpc.RpcError as exc:  # e.g. UNAUTHENTICATED: the gateway wants --api-key
                print(f"models       {exc.code().name}: {exc.details()}")
            else:
                for model in reply.models:
                    print(f"model        {model.name:<22} context {model.max_context_length} tokens")
    for name, address in addresses.items():
        if name.startswith("router") and statuses[name] == "SERVING":
            print_router_stats(address)
    if not all_serving:
        print("meshserve: not every service is serving (start the mesh with `meshserve up`)", file=sys.stderr)
        return 3
    return 0
