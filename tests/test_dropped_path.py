"""A worker whose network path goes silent: its process lives and its connection stays open, but every packet
is dropped (no reset, no error), as when a switch or a node's network fails. The router must find it by its
silence and resume the stream on another worker exactly.

The workers run in a network namespace this test creates, joined to this one by a veth pair on a private
/30; the drop is a firewall rule inside that namespace. It needs root, `ip` and iptables (nf_tables) or nft.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from meshserve.v1 import common_pb2, router_pb2
from support import (
    WAIT_S,
    ServiceProcess,
    free_ports,
    in_process_router,
    router_stub,
    service_env,
    stop_processes,
    wait_for_workers_up,
    wait_until_ready,
)

NAMESPACE = f"meshserve-test-{os.getpid()}"
HOST_SIDE, NAMESPACE_SIDE = "10.254.213.1", "10.254.213.2"  # a private /30 of our own
FIREWALL = shutil.which("iptables") or shutil.which("nft")

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or os.geteuid() != 0 or not shutil.which("ip") or FIREWALL is None,
    reason="needs Linux, root, ip and iptables or nft to make a network namespace and drop its packets",
)


def run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, timeout=30)


def in_namespace(*command: str) -> list[str]:
    return ["ip", "netns", "exec", NAMESPACE, *command]


@contextmanager
def namespace() -> Iterator[None]:
    """The namespace, its loopback up, and a veth pair: this side HOST_SIDE, that side NAMESPACE_SIDE."""
    veth = f"ms{os.getpid() % 100000}"
    run("ip", "netns", "add", NAMESPACE)
    try:
        run(*in_namespace("ip", "link", "set", "lo", "up"))
        run("ip", "link", "add", veth, "type", "veth", "peer", "name", f"{veth}n")
        run("ip", "link", "set", f"{veth}n", "netns", NAMESPACE)
        run("ip", "addr", "add", f"{HOST_SIDE}/30", "dev", veth)
        run("ip", "link", "set", veth, "up")
        run(*in_namespace("ip", "addr", "add", f"{NAMESPACE_SIDE}/30", "dev", f"{veth}n"))
        run(*in_namespace("ip", "link", "set", f"{veth}n", "up"))
        yield
    finally:
        subprocess.run(["ip", "link", "del", veth], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", NAMESPACE], capture_output=True, timeout=30)


def drop_port(port: int) -> None:
    """Silently drops every packet to and from `port` inside the namespace."""
    if os.path.basename(FIREWALL or "") == "nft":
        run(*in_namespace("nft", "add", "table", "inet", "meshserve_test"))
        for hook, match in (("input", "dport"), ("output", "sport")):
            run(*in_namespace("nft", "add", "chain", "inet", "meshserve_test", hook,
                              f"{{ type filter hook {hook} priority 0 ; }}"))  # fmt: skip
            run(*in_namespace("nft", "add", "rule", "inet", "meshserve_test", hook, "tcp", match, str(port), "drop"))
    else:
        run(*in_namespace("iptables", "-A", "INPUT", "-p", "tcp", "--dport", str(port), "-j", "DROP"))
        run(*in_namespace("iptables", "-A", "OUTPUT", "-p", "tcp", "--sport", str(port), "-j", "DROP"))


def test_a_worker_whose_network_path_drops_everything_is_left_and_its_stream_resumes(loop_thread, cache_dir, tmp_path):
    params = common_pb2.SamplingParams(max_tokens=200, temperature=0.8, seed=5, ignore_eos=True)
    request = common_pb2.TokenRequest(prompt_token_ids=[5, 6, 7], sampling=params)
    workers: list[ServiceProcess] = []
    with namespace():
        try:
            env = service_env(cache_dir)
            for port in free_ports(2):
                args = [
                    "worker",
                    "--host",
                    NAMESPACE_SIDE,
                    "--port",
                    str(port),
                    "--threads",
                    "1",
                    "--metrics-port",
                    "0",
                    "--insecure",  # off loopback (the namespace's address) without TLS, on purpose
                ]
                address = f"{NAMESPACE_SIDE}:{port}"
                with open(tmp_path / f"worker-{port}.log", "w") as log:
                    command = in_namespace(sys.executable, "-m", "meshserve.cli", *args)
                    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
                workers.append(ServiceProcess(address, process, tmp_path / f"worker-{port}.log"))
            for worker in workers:
                wait_until_ready(worker)
            with in_process_router(loop_thread, ",".join(w.address for w in workers)) as router:
                stub = router_stub(router.address)
                wait_for_workers_up(stub, 2)
                reference = [t for c in stub.Generate(request, timeout=WAIT_S) for t in c.token_ids]
                tokens: list[int] = []
                dropped = ""
                started = time.monotonic()
                for chunk in stub.Generate(request, timeout=WAIT_S):
                    tokens.extend(chunk.token_ids)
                    if not dropped and len(tokens) >= 10:
                        stats = stub.Stats(router_pb2.RouterStatsRequest(), timeout=5)
                        dropped = next(w.address for w in stats.workers if w.in_flight)
                        drop_port(int(dropped.rsplit(":", 1)[1]))
                elapsed = time.monotonic() - started
                assert dropped
                assert tokens == reference
                stats = stub.Stats(router_pb2.RouterStatsRequest(), timeout=5)
                assert stats.failovers == 1
                assert not next(w for w in stats.workers if w.address == dropped).up
                assert elapsed < 3.0 + 30, elapsed  # the silence bound (3 s) plus the stream
        finally:
            stop_processes((w.process for w in workers), grace=0)
