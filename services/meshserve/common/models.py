"""The models the mesh serves, as the gateway and the aggregator know them: read from the router, with tokenizers."""

from __future__ import annotations

import asyncio
import logging
import time
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

    async def refresh(self, timeout: float = 5.0) -> bool:
        """Reads the served models from the router. Returns whether any model is known afterwards."""
        self._last_refresh = time.monotonic()
        try:
            reply = await self.routers.stub.ListModels(common_pb2.ListModelsRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            log.info("router did not list models: %s", exc.code().name)
            return bool(self.models)
        for info in reply.models:
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
        return bool(self.models)

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
