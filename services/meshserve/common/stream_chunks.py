"""StreamChunk, the one stream message from a worker's step to the edge: chunks of one index that were
ready together leave a hop as one message (every hop coalesces while its reader is slow)."""

from __future__ import annotations

from collections.abc import Sequence

from meshserve.v1 import common_pb2


def joined(chunks: Sequence[common_pb2.StreamChunk]) -> common_pb2.StreamChunk:
    """One chunk for consecutive chunks of one index: tokens, logprobs and text joined in order; the finish,
    usage and error of the last. Reuses (changes) the first."""
    first = chunks[0]
    if len(chunks) == 1:
        return first
    texts = [first.text]
    for chunk in chunks[1:]:
        first.MergeFrom(chunk)  # repeated fields join; set scalars and messages are the later chunk's
        texts.append(chunk.text)
    first.text = "".join(texts)
    return first
