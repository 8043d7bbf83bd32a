"""meshserve.client: call the mesh's gateway (meshserve.v1.Inference) from Python, blocking or with asyncio.

    with Client("127.0.0.1:50051", api_key=KEY) as client:
        for chunk in client.stream("Tell me a story", max_tokens=64):
            print(chunk.text, end="")

Streams of typed chunks, whole completions, deadlines, retries that honour the server's RetryInfo and never
repeat a stream that produced tokens; every failure is a MeshClientError.
"""

from meshserve.client.async_client import AsyncChunkStream, AsyncClient
from meshserve.client.client import ChunkStream, Client
from meshserve.client.errors import MeshClientError
from meshserve.client.request import make_request
from meshserve.client.retry import NO_RETRIES, RetryPolicy
from meshserve.client.types import Chunk, Completion, Output, Usage

__all__ = [
    "NO_RETRIES",
    "AsyncChunkStream",
    "AsyncClient",
    "Chunk",
    "ChunkStream",
    "Client",
    "Completion",
    "MeshClientError",
    "Output",
    "RetryPolicy",
    "Usage",
    "make_request",
]
