"""The models the mesh serves, as the gateway and the aggregator know them: read from the router, with tokenizers."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from meshserve.common.errors import invalid_argument
from meshserve.common.routers import Routers
from meshserve.common.tokenizer import ModelTokenizer
from meshserve.v1 import common_pb2

log = logging.getLogger(__name__)


@dataclass
class ServedModel:
    info: common_pb2.ModelInfo
    tokenizer: ModelTokenizer

    @property
    def name(self) -> str:
        return self.info.name


class ModelCatalog:
    def __init__(self, routers: Routers) -> None:
        self.routers = routers
        self.models: dict[str, ServedModel] = {}
        self._last_refresh = 0.0
        self._reading = asyncio.Lock()  # callers at once share one read

    async def refresh(self, timeout: float = 5.0) -> bool:
        """Reads the served models from the router. Returns whether any model is known afterwards."""
        async with self._reading:
            return await self._read(timeout)

    async def refresh_if_older(self, max_age: float) -> None:
        """Refreshes unless the last read is younger than `max_age` seconds: how often callers asking for the
        model list can make the router send it (callers at once wait for one read)."""
        async with self._reading:
            if time.monotonic() - self._last_refresh >= max_age:
                await self._read(5.0)

    async def _read(self, timeout: float) -> bool:
        """Names first: the tokenizer files (megabytes per model) are asked for only when a model is new or
        changed."""
        self._last_refresh = time.monotonic()
        try:
            reply = await self.routers.stub.ListModels(common_pb2.ListModelsRequest(), timeout=timeout)
            if all(self._known(info) for info in reply.models):
                return bool(self.models)
            request = common_pb2.ListModelsRequest(include_tokenizer_files=True)
            reply = await self.routers.stub.ListModels(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            log.info("router did not list models: %s", exc.code().name)
            return bool(self.models)
        self._add(reply.models)
        return bool(self.models)

    def _known(self, listed: common_pb2.ModelInfo) -> bool:
        known = self.models.get(listed.name)
        if known is None:
            return False
        names_only = common_pb2.ModelInfo()
        names_only.CopyFrom(known.info)
        names_only.ClearField("tokenizer_files")
        return names_only == listed

    def _add(self, listed: Sequence[common_pb2.ModelInfo]) -> None:
        for info in listed:
            known = self.models.get(info.name)
            if known is not None and known.info == info:
                continue
            try:
                tokenizer = ModelTokenizer({k: bytes(v) for k, v in info.tokenizer_files.items()})
            except ValueError as exc:
                log.error("model %s cannot be served: %s", info.name, exc)
                continue
            self.models[info.name] = ServedModel(info, tokenizer)
            log.info("serving model %s (context %d)", info.name, info.max_context_length)

    async def refresh_if_unknown(self, name: str, min_interval: float = 1.0) -> None:
        """A model may be new since the last poll; a flood of bad names costs one refresh a second."""
        if name not in self.models and time.monotonic() - self._last_refresh >= min_interval:
            await self.refresh()

    def resolve(self, name: str) -> ServedModel:
        """The model a request names; an empty name picks the only model when there is just one."""
        if not name and len(self.models) == 1:
            return next(iter(self.models.values()))
        if name in self.models:
            return self.models[name]
        available = ", ".join(sorted(self.models)) or "none yet (the workers are still starting)"
        why = "is required when several models are served" if not name else f"unknown model {name!r}"
        raise invalid_argument([("model", f"{why}; available: {available}")])

    async def keep_fresh(self, interval: float, ready: asyncio.Event) -> None:
        """Polls quickly until a model is known (then sets `ready`), then every `interval` seconds."""
        while True:
            if await self.refresh():
                ready.set()
            await asyncio.sleep(interval if ready.is_set() else 0.5)
