"""Service configuration: one dataclass per service, from flags, then MESHSERVE_* variables, then defaults.

A field `max_num_seqs` is the flag `--max-num-seqs` and the variable `MESHSERVE_MAX_NUM_SEQS`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

ENV_PREFIX = "MESHSERVE_"

DEFAULT_HOST = "127.0.0.1"
GATEWAY_PORT = 50051
GATEWAY_HTTP_PORT = 8000
ROUTER_PORT = 50052
AGGREGATOR_PORT = 50053
FIRST_WORKER_PORT = 50061
# Prometheus /metrics, one port per service so a whole mesh fits on one machine.
GATEWAY_METRICS_PORT = 9400
ROUTER_METRICS_PORT = 9401
AGGREGATOR_METRICS_PORT = 9402
WORKER_METRICS_PORT = 9410
WORKER_METRICS_OFFSET = WORKER_METRICS_PORT - GATEWAY_METRICS_PORT


def cache_dir() -> Path:
    """Where meshserve keeps files: $MESHSERVE_CACHE, else $XDG_CACHE_HOME/meshserve or ~/.cache/meshserve."""
    if os.environ.get("MESHSERVE_CACHE"):
        return Path(os.environ["MESHSERVE_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "meshserve"


def _help(text: str) -> dict[str, Any]:
    return {"help": text}


def _metrics_port(default: int) -> Any:
    return field(default=default, metadata=_help("port of the Prometheus /metrics endpoint (0: none)"))


@dataclass
class ServerConfig:
    host: str = field(default=DEFAULT_HOST, metadata=_help("address to listen on"))
    port: int = field(default=0, metadata=_help("gRPC port (0 picks a free one)"))
    log_level: str = field(default="info", metadata=_help("debug, info, warning or error"))
    log_file: str = field(default="", metadata=_help("append JSON logs to this file instead of stderr"))
    # SIGTERM drains: no new work, in-flight streams get this long to finish.
    drain_seconds: float = field(default=30.0, metadata=_help("seconds in-flight calls get to finish on SIGTERM"))
    metrics_port: int = _metrics_port(0)
    trace: str = field(
        default="",
        metadata=_help("trace exporter: none, console or otlp (empty: from the OTEL_* variables, else none)"),
    )
    # TLS (common/tls.py): mutual inside the mesh, server-only at the gateway's public ports.
    tls_cert: str = field(default="", metadata=_help("PEM certificate chain of this service (empty: plaintext)"))
    tls_key: str = field(default="", metadata=_help("PEM private key of --tls-cert"))
    tls_ca: str = field(default="", metadata=_help("PEM CA bundle that signs the mesh's certificates"))
    insecure: bool = field(default=False, metadata=_help("serve plaintext on an address other than loopback (no TLS)"))


@dataclass
class WorkerConfig(ServerConfig):
    port: int = field(default=FIRST_WORKER_PORT, metadata=_help("gRPC port"))
    metrics_port: int = _metrics_port(WORKER_METRICS_PORT)
    model: str = field(default="", metadata=_help("Hugging Face model directory (default: the built-in tiny model)"))
    model_name: str = field(
        default="", metadata=_help("name the model is served under (default: the directory's name)")
    )
    max_num_seqs: int = field(default=32, metadata=_help("sequences decoded together at most"))
    max_num_batched_tokens: int = field(
        default=512, metadata=_help("tokens computed in one engine step at most (longer prompts go in chunks)")
    )
    block_size: int = field(default=16, metadata=_help("tokens per KV-cache block"))
    prefix_caching: bool = field(
        default=True, metadata=_help("reuse the KV blocks of prompt prefixes seen before (true or false)")
    )
    kv_cache_memory: str = field(
        default="auto",
        metadata=_help(
            "KV-cache pool: a size (512MiB, 2GB), a fraction of free memory (0.3), or auto "
            "(0.9 of free GPU memory; on CPU 10%% of available memory, at most 1 GiB)"
        ),
    )
    threads: int = field(default=0, metadata=_help("torch CPU threads (0: half the cores, at least 1)"))
    kernels: str = field(default="auto", metadata=_help("auto (Triton on CUDA, PyTorch elsewhere), triton or torch"))
    model_impl: str = field(
        default="auto",
        metadata=_help(
            "auto (the fast path for Llama, Mistral and Qwen2; transformers for the rest), fast or transformers"
        ),
    )
    compile: str = field(
        default="auto",
        metadata=_help(
            "compile the fast path's decode step: auto (torch.compile on CPU, CUDA graphs on CUDA), on, off"
        ),
    )
    dtype: str = field(
        default="auto",
        metadata=_help("auto (bfloat16 on the fast path and on CUDA, else float32), float32, bfloat16 or float16"),
    )
    stream_interval: int = field(
        default=1,
        metadata=_help(
            "tokens per message of each stream: 1 sends every token as soon as it is computed; N sends fewer "
            "messages (less CPU per token on every hop) and each token up to N - 1 steps later; a stream's "
            "first token and its end always go at once"
        ),
    )
    engine_stall_seconds: float = field(
        default=60.0,
        metadata=_help(
            "with sequences in the engine and no step for this long, the engine is wedged: the worker stops "
            "serving and exits non-zero, so its supervisor replaces it and routers resume its sequences (0: never)"
        ),
    )


@dataclass
class RouterConfig(ServerConfig):
    port: int = field(default=ROUTER_PORT, metadata=_help("gRPC port"))
    metrics_port: int = _metrics_port(ROUTER_METRICS_PORT)
    workers: str = field(
        default=f"{DEFAULT_HOST}:{FIRST_WORKER_PORT}",
        metadata=_help(
            "comma-separated workers: host:port, dns:///name:port (every address of name) "
            "or k8s:///namespace/service:port (the Service's ready EndpointSlices)"
        ),
    )
    discovery_seconds: float = field(default=10.0, metadata=_help("how often DNS and Kubernetes workers are re-read"))
    max_queued: int = field(default=1024, metadata=_help("requests waiting at most; then BATCH and LOW are shed"))
    tenant_queue_share: float = field(
        default=0.5,
        metadata=_help("fraction of --max-queued one tenant's waiting requests may fill (1: no per-tenant bound)"),
    )
    max_connection_age_seconds: float = field(
        default=300.0,
        metadata=_help(
            "callers (gateways, aggregators) are asked to reconnect after this long, running calls getting as long "
            "again, so that callers of a dns:/// name spread over routers added since (0: never)"
        ),
    )
    aging_seconds: float = field(default=5.0, metadata=_help("waiting this long raises a request one priority class"))
    slo_ttft: str = field(
        default="",
        metadata=_help(
            "time-to-first-token objectives per class, e.g. critical=150ms,high=300ms: lower classes are held back "
            "as a class nears its target, and BATCH and LOW shed while it keeps missing it (empty: none)"
        ),
    )
    affinity_slack: int = field(
        default=2, metadata=_help("how much busier the worker holding a prompt's prefix may be and still get it")
    )
    max_failovers: int = field(default=2, metadata=_help("workers a request may resume on after one fails"))
    worker_silence_seconds: float = field(
        default=3.0,
        metadata=_help(
            "a worker that sends nothing this long (it reports its load every second) is taken as gone: its "
            "stream ends and its requests resume on others"
        ),
    )


@dataclass
class AggregatorConfig(ServerConfig):
    port: int = field(default=AGGREGATOR_PORT, metadata=_help("gRPC port"))
    metrics_port: int = _metrics_port(AGGREGATOR_METRICS_PORT)
    router: str = field(default=f"{DEFAULT_HOST}:{ROUTER_PORT}", metadata=_help("router address"))
    max_n: int = field(
        default=64,
        metadata=_help("most sub-requests one request may fan out into (inputs x best_of, or map chunks)"),
    )
    tenant_max_in_flight: int = field(
        default=256, metadata=_help("most sub-requests one tenant's requests may have running at once")
    )
    model_refresh_seconds: float = field(
        default=30.0, metadata=_help("how often to re-read the served models (map-reduce tokenises)")
    )


@dataclass
class GatewayConfig(ServerConfig):
    port: int = field(default=GATEWAY_PORT, metadata=_help("gRPC port"))
    metrics_port: int = _metrics_port(GATEWAY_METRICS_PORT)
    http_port: int = field(
        default=GATEWAY_HTTP_PORT,
        metadata=_help("HTTP port for the OpenAI-compatible API and the chat page (0 picks a free one, -1: none)"),
    )
    router: str = field(default=f"{DEFAULT_HOST}:{ROUTER_PORT}", metadata=_help("router address"))
    aggregator: str = field(default=f"{DEFAULT_HOST}:{AGGREGATOR_PORT}", metadata=_help("aggregator address"))
    default_max_tokens: int = field(default=256, metadata=_help("max_tokens when a request leaves it unset"))
    slo_ttft: str = field(
        default="",
        metadata=_help("time-to-first-token objectives per class, as the router's (metrics: attainment per class)"),
    )
    max_n: int = field(default=64, metadata=_help("largest n a request may ask for"))
    model_refresh_seconds: float = field(default=30.0, metadata=_help("how often to re-read the served models"))
    api_keys_file: str = field(
        default="", metadata=_help("JSON file of tenants and SHA-256 hashes of their API keys (empty: no keys)")
    )
    allow_unauthenticated: bool = field(
        default=False, metadata=_help("serve without API keys on an address other than loopback")
    )
    log_text: bool = field(
        default=False,
        metadata=_help("log each request's prompt and generated text (debugging; off: text never reaches the logs)"),
    )
    http_max_body_bytes: int = field(default=8 * 1024 * 1024, metadata=_help("largest HTTP request body"))
    http_timeout_seconds: float = field(
        default=600.0, metadata=_help("deadline of an HTTP request in the mesh (HTTP has no deadline of its own)")
    )
    max_request_seconds: float = field(
        default=300.0,
        metadata=_help(
            "longest a gRPC call may run in the mesh: the deadline of a call that sets none, or sets a longer one"
        ),
    )
    http_body_seconds: float = field(
        default=60.0, metadata=_help("a request whose body has not all arrived this long is refused (408)")
    )
    http_keepalive_seconds: float = field(
        default=15.0,
        metadata=_help(
            "an HTTP connection that has not sent a whole request's headers this long after it opened or after "
            "its last response is closed (idle keep-alive and slow headers alike)"
        ),
    )
    http_max_connections: int = field(
        default=1024, metadata=_help("open HTTP connections at most; more are closed as they arrive")
    )
    prefix_cache_scope: str = field(
        default="tenant",
        metadata=_help(
            "who shares the workers' prefix cache: 'tenant' (a prompt reuses cached blocks only of its own "
            "tenant's prompts, so no tenant can time another's) or 'shared' (every tenant's, more hits)"
        ),
    )
    http_allowed_origins: str = field(
        default="",
        metadata=_help(
            "comma-separated origins (scheme://host:port) of web pages that may call the HTTP API besides the "
            "gateway's own; a request from any other page is refused (403)"
        ),
    )
    http_allowed_hosts: str = field(
        default="",
        metadata=_help(
            "comma-separated host names a loopback gateway answers to besides localhost and loopback addresses "
            "(a page re-pointing its own name at 127.0.0.1 is refused: DNS rebinding)"
        ),
    )
    gateway_replicas: int = field(
        default=1,
        metadata=_help(
            "gateways that serve the same keys file: each enforces 1/N of every tenant's requests_per_second "
            "and tokens_per_minute (rate limits are counted per gateway process)"
        ),
    )


C = TypeVar("C", bound=ServerConfig)


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def add_arguments(parser: argparse.ArgumentParser, config_type: type[ServerConfig]) -> None:
    """Adds one flag per config field. Defaults stay None so from_args can tell a flag from an env var."""
    for f in dataclasses.fields(config_type):
        parser.add_argument(
            flag_name(f.name),
            dest=f.name,
            type=_parser_for(f.type),
            default=None,
            # A bare boolean flag (--allow-unauthenticated) means true.
            **({"nargs": "?", "const": True} if str(f.type) == "bool" else {}),
            help=f"{f.metadata.get('help', '')} [env {env_name(f.name)}, default {f.default!r}]",
        )


def from_args(config_type: type[C], args: argparse.Namespace | None = None, **overrides: Any) -> C:
    """Builds a config: explicit overrides, then flags, then MESHSERVE_* variables, then defaults."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(config_type):
        parse = _parser_for(f.type)
        if f.name in overrides:
            values[f.name] = overrides[f.name]
        elif args is not None and getattr(args, f.name, None) is not None:
            values[f.name] = getattr(args, f.name)
        elif env_name(f.name) in os.environ:
            raw = os.environ[env_name(f.name)]
            try:
                values[f.name] = parse(raw)
            except ValueError as exc:
                raise SystemExit(f"meshserve: {env_name(f.name)}={raw!r} is not a valid {f.type}: {exc}") from exc
    return config_type(**values)


def _parser_for(type_name: Any) -> Any:
    # Fields are annotated as strings (from __future__ import annotations).
    return {"int": int, "float": float, "str": str, "bool": _parse_bool}[str(type_name)]


def _parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, not {raw!r}")
