"""The OpenAI HTTP API as a benchmark target: streaming /v1/completions or /v1/chat/completions, one request
each, with usage asked for at the end (stream_options.include_usage), on meshserve's gateway, vLLM or any
other server that speaks it.

Its events carry text, not tokens: a record's output token count is the usage the server reports, and how
those tokens split over the events is estimated in records.py (when a server puts one token in each event,
as vLLM does, the estimate is exact). Events that carry `token_ids` (vLLM's `return_token_ids`) count them.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import aiohttp

from meshserve.loadgen.target import OK, Chunk, Reply, TargetError
from meshserve.loadgen.workload import Endpoint, RequestSpec

CONNECT_TIMEOUT_S = 10.0


class OpenAITarget:
    def __init__(
        self,
        base_url: str,
        *,
        api_key: str = "",
        model: str = "",
        endpoint: Endpoint = "completions",
        timeout: float = 300.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")  # ends in /v1, as the openai client's base_url
        self.endpoint = endpoint
        self.timeout = timeout  # seconds each request may take, whole stream included
        self._model = model
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._session: aiohttp.ClientSession | None = None

    @property
    def name(self) -> str:
        return f"openai {self.base_url}"

    @property
    def model(self) -> str:
        return self._model

    def describe(self) -> dict[str, object]:
        return {"api": "openai", "base_url": self.base_url, "model": self._model, "endpoint": self.endpoint}

    async def __aenter__(self) -> OpenAITarget:
        # No connection limit: a level's concurrency, not the client's pool, decides how many streams are open.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            headers=self._headers,
        )
        try:
            self._model = await self._discover()
        except BaseException:
            await self._session.close()
            raise
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()

    async def _discover(self) -> str:
        """The model to ask for: the one given, else the first GET /models lists (a server started with one model
        lists just that one). The server must answer either way: a benchmark of nothing fails here, at once."""
        assert self._session is not None
        url = f"{self.base_url}/models"
        try:
            async with self._session.get(url, timeout=aiohttp.ClientTimeout(total=CONNECT_TIMEOUT_S)) as response:
                if self._model:
                    return self._model
                if response.status != 200:
                    raise TargetError(
                        f"GET {url} answered HTTP {response.status}: {_error_text(await response.read())}"
                    )
                models = (await response.json(content_type=None)).get("data") or []
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TargetError(f"cannot reach {self.base_url} ({type(exc).__name__}: {exc})") from None
        except (ValueError, AttributeError):
            raise TargetError(f"GET {url} did not answer an OpenAI model list") from None
        if not models:
            raise TargetError(f"{self.base_url} serves no model yet (GET {url} lists none); or pass --model")
        return str(models[0]["id"])

    def body(self, request: RequestSpec) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self._model, "max_tokens": request.max_tokens}
        body |= {"temperature": request.temperature, "stream": True, "stream_options": {"include_usage": True}}
        if request.ignore_eos:
            body["ignore_eos"] = True  # vLLM's extension, and meshserve's; OpenAI's own API refuses it
        if request.seed is not None:
            body["seed"] = request.seed
        if self.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": request.prompt_text}]
        elif request.prompt_token_ids is not None:
            body["prompt"] = list(request.prompt_token_ids)
        else:
            body["prompt"] = request.prompt_text
        return body

    async def send(self, request: RequestSpec) -> Reply:
        assert self._session is not None, "use the target as `async with OpenAITarget(...) as target`"
        path = "/chat/completions" if self.endpoint == "chat" else "/completions"
        reply = Reply(sent_at=time.perf_counter())
        try:
            headers = {"X-Request-Id": request.request_id} if request.request_id else None
            async with self._session.post(self.base_url + path, json=self.body(request), headers=headers) as response:
                if response.status != 200:
                    reply.status, reply.error = f"HTTP {response.status}", _error_text(await response.read())
                    reply.retry_delay = _seconds(response.headers.get("Retry-After", ""))
                else:
                    await _read_stream(response, reply)
        except aiohttp.ClientError as exc:
            reply.status, reply.error = "CONNECTION_ERROR", f"{type(exc).__name__}: {exc}"
        except TimeoutError:
            reply.status, reply.error = "TIMEOUT", f"no end of stream within {self.timeout:g} s"
        except ValueError as exc:
            reply.status, reply.error = "BAD_RESPONSE", f"an event that is not JSON: {exc}"
        reply.ended_at = time.perf_counter()
        return reply


async def _read_stream(response: aiohttp.ClientResponse, reply: Reply) -> None:
    async for data, arrived in sse_events(response.content):
        if data == "[DONE]":
            break
        event = json.loads(data)
        if "error" in event:  # after the headers a server can only fail in an event
            error = event["error"] if isinstance(event["error"], dict) else {"message": str(event["error"])}
            code = error.get("code")
            reply.status = code.upper() if isinstance(code, str) else f"HTTP {code}" if code else "STREAM_ERROR"
            reply.error = str(error.get("message", ""))
            return
        for choice in event.get("choices") or []:
            text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
            ids = choice.get("token_ids")
            if text or ids:
                reply.chunks.append(Chunk(arrived, len(ids) if isinstance(ids, list) else None, text or ""))
            if choice.get("finish_reason"):
                reply.finish_reason = str(choice["finish_reason"])
        if usage := event.get("usage"):
            reply.completion_tokens = usage.get("completion_tokens")
            reply.prompt_tokens = usage.get("prompt_tokens")
    if reply.status == OK and not reply.finish_reason:
        reply.status, reply.error = "INCOMPLETE_STREAM", "the stream ended before any finish_reason"


async def sse_events(content: aiohttp.StreamReader) -> AsyncIterator[tuple[str, float]]:
    """(data, perf_counter time its last byte arrived) of each server-sent event, as the bytes come: split by
    hand, since aiohttp's line reader refuses lines past 64 KiB and an event can be longer."""
    buffer = b""
    data: list[str] = []
    async for piece in content.iter_any():
        arrived = time.perf_counter()
        buffer += piece
        *lines, buffer = buffer.split(b"\n")
        for raw in lines:
            line = raw.rstrip(b"\r").decode("utf-8")
            if not line:  # a blank line ends an event
                if data:
                    yield "\n".join(data), arrived
                data = []
            elif line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
    if data:
        yield "\n".join(data), time.perf_counter()


def _seconds(text: str) -> float | None:
    """A Retry-After of seconds (the HTTP-date form is not used by inference servers)."""
    try:
        return float(text)
    except ValueError:
        return None


def _error_text(body: bytes) -> str:
    """The message of OpenAI's `{"error": {"message": ...}}`, else the body's start."""
    try:
        return str(json.loads(body)["error"]["message"])[:300]
    except (ValueError, KeyError, TypeError):
        return body.decode("utf-8", "replace").strip()[:300]
