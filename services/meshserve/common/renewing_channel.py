"""A client channel whose TLS certificate follows its files, as servers' certificates do (common/tls.py).

gRPC reads a channel's credentials once, when the channel is made. A service that only ever kept its first
channel would show its first certificate at every reconnect (after a peer restarts, after a router's maximum
connection age), and once that certificate expired or its CA was replaced, the mesh would stop connecting.
So when the files change, new calls go on a new channel (a new handshake, the new certificate and CA); calls
already running on the old one finish there, and the old channel is closed when its owner says so, or after a
grace long enough for any request to end.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from meshserve.common.tls import MeshTls

log = logging.getLogger(__name__)

# How often the files are looked at (three stat calls): certificates are rotated in hours or days, not seconds.
RECHECK_S = 10.0
T = TypeVar("T")


class RenewingChannel:
    """`make(credentials_and_options)` builds the channel (aio_channel's keyword arguments); with `tls`, it is
    built again whenever the service's TLS files change. `retire_grace_s`: how long a replaced channel keeps its
    running calls before it is closed; None keeps it until `close_retired()`."""

    def __init__(
        self,
        make: Callable[..., grpc.aio.Channel],
        tls: MeshTls | None,
        peer_role: str,
        retire_grace_s: float | None = 600.0,
    ) -> None:
        self._build = lambda: make(**(tls.channel_args(peer_role) if tls else {}))
        self._files = tls.files if tls else None
        self._stamp = self._files.stamp() if self._files else None
        self._checked = time.monotonic()
        self.retire_grace_s = retire_grace_s
        self._channel = self._build()
        self._derived: dict[str, tuple[grpc.aio.Channel, Any]] = {}
        self._retired: list[grpc.aio.Channel] = []
        self._closing: set[asyncio.Task] = set()
        self.renewals = 0

    @property
    def channel(self) -> grpc.aio.Channel:
        """The current channel (a new one if the files changed since it was made)."""
        self._renew_if_changed()
        return self._channel

    def derived(self, key: str, build: Callable[[grpc.aio.Channel], T]) -> T:
        """`build(channel)` (a stub, a multicallable) for the current channel, made once per channel."""
        channel = self.channel
        entry = self._derived.get(key)
        if entry is None or entry[0] is not channel:
            entry = (channel, build(channel))
            self._derived[key] = entry
        return entry[1]

    def recheck_now(self) -> None:
        """The next use looks at the files at once (tests, and an operator's signal)."""
        self._checked = float("-inf")

    def close_retired(self) -> None:
        """Closes the replaced channels now (their owner moved everything to the new one)."""
        retired, self._retired = self._retired, []
        for channel in retired:
            self._close_later(channel, 0)

    async def close(self) -> None:
        for task in list(self._closing):
            task.cancel()
        await asyncio.gather(*(c.close() for c in [self._channel, *self._retired]), return_exceptions=True)
        self._retired.clear()

    def _renew_if_changed(self) -> None:
        if self._files is None or time.monotonic() - self._checked < RECHECK_S:
            return
        self._checked = time.monotonic()
        try:
            stamp = self._files.stamp()
            if stamp == self._stamp:
                return
            self._files.check_pair()
            fresh = self._build()
        except (OSError, ssl.SSLError) as exc:
            log.warning("TLS files %s not reloaded (keeping the previous ones): %s", self._files.cert, exc)
            return
        old, self._channel, self._stamp = self._channel, fresh, stamp
        self.renewals += 1
        log.info("TLS certificate %s reloaded: new connections show it", self._files.cert)
        if self.retire_grace_s is None:
            self._retired.append(old)
        else:
            self._close_later(old, self.retire_grace_s)

    def _close_later(self, channel: grpc.aio.Channel, grace: float) -> None:
        # close(grace) refuses new calls at once and cancels what still runs when the grace ends.
        task = asyncio.get_running_loop().create_task(channel.close(grace))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
