"""A live progress bar on stderr while a level runs (tqdm), only when stderr is a terminal: requests done (of the
level's count, when it has one), errors, tokens per second so far, and the time against the level's duration."""

from __future__ import annotations

import asyncio
import sys
import time

from tqdm import tqdm

from meshserve.loadgen.levels import LoadLevel
from meshserve.loadgen.records import RequestRecord

REFRESH_S = 0.5


class LevelProgress:
    def __init__(self, level: LoadLevel, enabled: bool | None = None) -> None:
        self.level = level
        self.started = time.perf_counter()
        self.ok = self.errors = self.tokens = 0
        on = sys.stderr.isatty() if enabled is None else enabled
        self.bar = tqdm(
            total=level.requests, desc=level.label, unit="req", file=sys.stderr, disable=not on, leave=False
        )

    def on_record(self, record: RequestRecord) -> None:
        if record.ok:
            self.ok, self.tokens = self.ok + 1, self.tokens + record.output_tokens
        else:
            self.errors += 1
        self._describe(refresh=False)
        self.bar.update(1)  # redraws, with the new counts

    def _describe(self, refresh: bool = True) -> None:
        elapsed = time.perf_counter() - self.started
        clock = f"{elapsed:.0f}/{self.level.duration:g} s" if self.level.duration else f"{elapsed:.0f} s"
        rate = self.tokens / elapsed if elapsed > 0 else 0.0
        self.bar.set_postfix_str(f"ok {self.ok}, errors {self.errors}, {rate:.0f} tok/s, {clock}", refresh=refresh)

    async def tick(self) -> None:
        """Refreshes the bar while requests are slow to end; cancel it when the level is done."""
        while True:
            await asyncio.sleep(REFRESH_S)
            self._describe()

    def close(self) -> None:
        self.bar.close()
