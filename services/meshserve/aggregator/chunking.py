"""Splitting a long text into chunks of at most a token budget, at the most natural boundary that fits.

Paragraphs (blank lines) stay whole when they fit; a longer paragraph is cut between sentences, a
longer sentence between words, and a longer word (a URL, a run without spaces) every budget // 4
characters (a character is at most 4 byte-tokens). Pieces are then packed greedily, in order, into
chunks, and each chunk's exact token count is checked (tokens at a join can differ from the sum of
its pieces).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")
SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+")
WORD_BREAK = re.compile(r"\s+")
MAX_TOKENS_PER_CHAR = 4

CountTokens = Callable[[str], int]


def split_text(text: str, count_tokens: CountTokens, budget: int) -> list[str]:
    """The chunks of `text` in order, each at most `budget` tokens by count_tokens; none empty."""
    if budget < MAX_TOKENS_PER_CHAR:
        raise ValueError(f"a chunk budget of {budget} tokens is too small (at least {MAX_TOKENS_PER_CHAR})")
    pieces = list(_pieces(text, count_tokens, budget))
    chunks: list[str] = []
    start = 0
    for _ in range(len(pieces)):  # each pass emits at least one piece
        if start == len(pieces):
            break
        end, estimate = start + 1, pieces[start][2]
        while end < len(pieces) and estimate + pieces[end][2] <= budget:
            estimate += pieces[end][2]
            end += 1
        while end - start > 1 and count_tokens(_join(pieces[start:end])) > budget:
            end -= 1
        chunks.append(_join(pieces[start:end]))
        start = end
    assert start == len(pieces)
    return chunks


def _join(pieces: list[tuple[str, str, int]]) -> str:
    return "".join(sep + text if i else text for i, (sep, text, _) in enumerate(pieces))


def _pieces(text: str, count_tokens: CountTokens, budget: int) -> Iterator[tuple[str, str, int]]:
    """(separator before it, text, tokens) of each piece small enough for a chunk."""
    for paragraph in PARAGRAPH_BREAK.split(text.strip()):
        yield from _fit(paragraph.strip(), "\n\n", [SENTENCE_END, WORD_BREAK], count_tokens, budget)


def _fit(
    text: str, separator: str, finer: list[re.Pattern[str]], count_tokens: CountTokens, budget: int
) -> Iterator[tuple[str, str, int]]:
    if not text:
        return
    tokens = count_tokens(text)
    if tokens <= budget:
        yield separator, text, tokens
    elif finer:
        parts = [p for p in finer[0].split(text) if p]
        for i, part in enumerate(parts):
            yield from _fit(part, separator if i == 0 else " ", finer[1:], count_tokens, budget)
    else:
        width = budget // MAX_TOKENS_PER_CHAR
        for i in range(0, len(text), width):
            part = text[i : i + width]
            yield (separator if i == 0 else ""), part, count_tokens(part)
