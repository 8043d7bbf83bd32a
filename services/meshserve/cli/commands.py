"""The command-line client: `meshserve generate` and `meshserve status`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import grpc

from meshserve.cli.launcher import role_of, state_file
from meshserve.client import NO_RETRIES, Chunk, Client, MeshClientError, Usage, make_request
from meshserve.common import config as cfg
from meshserve.common.channels import health_status, sync_channel
from meshserve.common.tls import TlsFiles, target_options
from meshserve.v1 import common_pb2, inference_pb2, router_pb2, router_pb2_grpc


def build_request(args: argparse.Namespace) -> inference_pb2.GenerateRequest:
    sampling = {
        "top_k": args.top_k,
        "stop": args.stop,
        "min_p": args.min_p,
        "presence_penalty": args.presence_penalty,
        "frequency_penalty": args.frequency_penalty,
        "ignore_eos": args.ignore_eos,
        "min_tokens": args.min_tokens,
        "include_stop_str_in_output": args.include_stop_str,
    }
    if args.show_special_tokens:
        sampling["skip_special_tokens"] = False
    # Unset optional fields keep the gateway's defaults.
    for name in ("repetition_penalty", "max_tokens", "temperature", "top_p", "seed"):
        if getattr(args, name) is not None:
            sampling[name] = getattr(args, name)
    prompt = {"messages": [{"role": "user", "content": args.prompt}]} if args.chat else {"prompt": args.prompt}
    return make_request(**prompt, model=args.model, n=args.n, priority=args.priority, **sampling)


def local_mesh_tls() -> TlsFiles | None:
    """The CA and a certificate of the mesh `meshserve up --tls` runs (from its state file), else None."""
    state = state_file()
    tls = json.loads(state.read_text()).get("tls") if state.exists() else None
    return TlsFiles(Path(tls["cert"]), Path(tls["key"]), Path(tls["ca"])) if tls else None


def gateway_ca(args: argparse.Namespace) -> str | None:
    """The CA to verify the gateway with: --tls-ca, else that of `meshserve up --tls` when --gateway is its
    gateway, else None (plaintext)."""
    if args.tls_ca:
        return args.tls_ca
    tls = local_mesh_tls()
    if tls is None:
        return None
    services = json.loads(state_file().read_text())["services"]
    return str(tls.ca) if any(s["name"] == "gateway" and s["address"] == args.gateway for s in services) else None


def generate_command(args: argparse.Namespace) -> int:
    request = build_request(args)
    try:
        ca = gateway_ca(args)
        with Client(args.gateway, api_key=args.api_key, timeout=args.timeout, root_certificates=ca) as client:
            if args.stream:
                with client.stream(request=request) as chunks:
                    _print_stream(chunks, args.n)
            else:
                completion = client.generate(request=request)
                for output in completion.outputs:
                    if args.n > 1:
                        print(f"--- [{output.index}] ({output.finish_reason or '?'})")
                    print(output.text)
                _print_usage(completion.usage)
    except MeshClientError as exc:
        return _report_error(exc, args.gateway)
    except KeyboardInterrupt:
        print("\nmeshserve: cancelled", file=sys.stderr)
        return 130
    return 0


def _print_stream(chunks: Iterable[Chunk], n: int) -> None:
    """One completion streams as it comes; several are printed each as soon as it finishes."""
    pending: dict[int, list[str]] = {}
    for chunk in chunks:
        if chunk.final:
            if n == 1:
                print()
            _print_usage(chunk.usage)
        elif n == 1:
            print(chunk.text, end="", flush=True)
        else:
            pending.setdefault(chunk.index, []).append(chunk.text)
            if chunk.finish_reason:
                print(f"--- [{chunk.index}] ({chunk.finish_reason})\n{''.join(pending.pop(chunk.index))}", flush=True)


def _print_usage(usage: Usage | None) -> None:
    usage = usage or Usage()
    print(
        f"[{usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens]",
        file=sys.stderr,
    )


def _report_error(exc: MeshClientError, gateway: str) -> int:
    if exc.code == grpc.StatusCode.UNAVAILABLE and not exc.tokens_received:
        print(
            f"meshserve: cannot reach the gateway at {gateway} ({exc.message}).\n"
            "Is the mesh running? Start it with `meshserve up`, or pass --gateway ADDR.",
            file=sys.stderr,
        )
        return 3
    print(f"meshserve: {exc}", file=sys.stderr)
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


def _channel_args(tls: TlsFiles | None, role: str) -> dict[str, Any]:
    return {"credentials": tls.channel_credentials(), "options": target_options(role)} if tls else {}


def print_router_stats(address: str, tls: TlsFiles | None = None) -> None:
    """Queues per class and each worker's load, as the router sees them."""
    with sync_channel(address, **_channel_args(tls, "router")) as channel:
        stats = router_pb2_grpc.RouterStub(channel).Stats(router_pb2.RouterStatsRequest(), timeout=5)
    queues = ", ".join(
        f"{common_pb2.Priority.Name(q.priority).removeprefix('PRIORITY_').lower()} {q.queued}"
        + (f" (oldest {q.oldest_wait_ms} ms)" if q.queued else "")
        for q in stats.queues
    )
    print(f"queues       {queues}")
    for q in stats.queues:
        if q.recent_ttft_p50_ms or q.ttft_objective_ms or q.held_seats:
            print(f"ttft         {_class_ttft(q)}")
    print(
        f"router       dispatched {stats.dispatched}, shed {stats.shed} (for objectives {stats.objective_shed}), "
        f"deadline exceeded {stats.deadline_exceeded} (refused on arrival {stats.deadline_refused}), "
        f"failovers {stats.failovers}"
    )
    for worker in stats.workers:
        load = worker.load
        state = "up" if worker.up else ("draining" if worker.draining else "down")
        print(
            f"worker       {worker.address:<22} {state:<8} running {load.running_sequences}/{load.max_num_seqs}, "
            f"waiting {load.waiting_sequences}, KV blocks free {load.free_kv_blocks}/{load.total_kv_blocks}, "
            f"{load.tokens_per_second:.0f} tok/s, prefix hits {load.prefix_cache_hit_rate:.0%}"
        )


def _class_ttft(q: router_pb2.QueueStats) -> str:
    """One class's recent time to first token at the router, against its objective if it has one."""
    line = f"{common_pb2.Priority.Name(q.priority).removeprefix('PRIORITY_').lower():<8} recent p50 "
    line += f"{q.recent_ttft_p50_ms} ms, p99 {q.recent_ttft_p99_ms} ms"
    if q.ttft_objective_ms:
        line += f"; objective {q.ttft_objective_ms} ms, met by {q.objective_attainment:.0%}"
    if q.held_seats:
        line += f"; held back from {q.held_seats} seats per worker"
    return line


def _router_sees_workers_up(router: str, tls: TlsFiles | None) -> bool:
    with sync_channel(router, **_channel_args(tls, "router")) as channel:
        try:
            stats = router_pb2_grpc.RouterStub(channel).Stats(router_pb2.RouterStatsRequest(), timeout=5)
        except grpc.RpcError:
            return False
    return bool(stats.workers) and all(w.up for w in stats.workers)


def status_command(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.wait
    # With `meshserve up --tls`, every check shows its gateway's certificate (Health answers any of the mesh).
    tls = local_mesh_tls() if args.gateway is None else None
    while True:
        services = local_mesh_services(args.gateway)
        statuses = {s["name"]: health_status(s["address"], **_channel_args(tls, role_of(s["name"]))) for s in services}
        all_serving = all(s == "SERVING" for s in statuses.values())
        routers = [s["address"] for s in services if s["name"].startswith("router")]
        # Ready means the routers have their workers' first load reports too, not only that each process serves.
        if (all_serving and all(_router_sees_workers_up(r, tls) for r in routers)) or time.monotonic() >= deadline:
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
        ca = args.tls_ca or (str(tls.ca) if tls else None)
        with Client(gateway, api_key=args.api_key, timeout=5, retry=NO_RETRIES, root_certificates=ca) as client:
            try:
                models = client.list_models()
            except MeshClientError as exc:  # e.g. UNAUTHENTICATED: the gateway wants --api-key
                print(f"models       {exc.code.name}: {exc.message}")
            else:
                for model in models:
                    print(f"model        {model.name:<22} context {model.max_context_length} tokens")
    for name, address in addresses.items():
        if name.startswith("router") and statuses[name] == "SERVING":
            print_router_stats(address, tls)
    if not all_serving:
        print("meshserve: not every service is serving (start the mesh with `meshserve up`)", file=sys.stderr)
        return 3
    return 0
