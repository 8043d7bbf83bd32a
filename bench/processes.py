"""Process helpers the benches share: CPU time from /proc, stopping a process group, free loopback ports, spawning."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HOST = "127.0.0.1"


def _proc_stat(pid: int) -> tuple[int, int, int] | None:
    """(ppid, utime + stime in ticks, start time in ticks) from /proc/PID/stat; None if it is gone or a zombie."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw.rsplit(")", 1)[1].split()  # the name in parentheses may hold spaces
    if fields[0] == "Z":
        return None
    return int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[19])


def process_tree(root: int) -> dict[int, tuple[int, int]]:
    """{pid: (cpu ticks, start time)} of root and every descendant alive now."""
    stats = {int(p): s for p in os.listdir("/proc") if p.isdigit() and (s := _proc_stat(int(p))) is not None}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    tree, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            tree[pid] = (stats[pid][1], stats[pid][2])
            todo.extend(children.get(pid, []))
    return tree


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds (user + system) of root and its descendants alive now (a child that exited takes its own)."""
    return sum(ticks for ticks, _ in process_tree(root).values()) / os.sysconf("SC_CLK_TCK")


def stop_process_group(process: subprocess.Popen[bytes], grace: float = 30.0) -> None:
    """SIGTERM to the process group, then SIGKILL to whatever of its process tree is left.

    `meshserve up` starts each service in a session of its own (so Ctrl-C reaches only the launcher), so the
    group alone does not hold them: the tree is noted first and swept by pid and start time (never a reused pid).
    """
    tree = process_tree(process.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(pid, start) for pid, (_, start) in tree.items()):
        process.poll()  # reaps the launcher
        time.sleep(0.2)
    for pid, (_, start) in tree.items():
        if _alive(pid, start):
            print(f"bench: pid {pid} did not stop in {grace:.0f} s; killing it", file=sys.stderr)
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _alive(pid: int, start: int) -> bool:
    return (stat := _proc_stat(pid)) is not None and stat[2] == start


def free_port_block(size: int) -> int:
    """A base port with base .. base + size - 1 all free on the loopback address now."""
    for base in random.sample(range(20000, 60000 - size, size), 200):
        with contextlib.ExitStack() as sockets:
            try:
                for port in range(base, base + size):
                    sockets.enter_context(socket.socket()).bind((HOST, port))
                return base
            except OSError:
                continue
    raise SystemExit("bench: found no block of free ports")


def spawn(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Starts `command` in a session (and process group) of its own, its output appended to `log`."""
    log.write_text(f"$ {' '.join(command)}\n")
    with open(log, "ab") as out:
        return subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )
