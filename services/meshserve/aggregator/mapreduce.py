"""Map-reduce over a long text: the chunk budget, the map prompts, and the reduce prompt over their outputs.

Templates and their defaults (summarisation) are meshserve.common.map_reduce's. Only one reduce
runs: the map outputs must fit in its prompt, which is checked before any map call starts.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshserve.aggregator.chunking import split_text
from meshserve.common.errors import invalid_argument
from meshserve.common.map_reduce import (
    CHUNK_PLACEHOLDER,
    DEFAULT_MAP_TEMPLATE,
    DEFAULT_REDUCE_TEMPLATE,
    OUTPUTS_PLACEHOLDER,
    template_violations,
)
from meshserve.common.tokenizer import ModelTokenizer
from meshserve.v1 import common_pb2

OUTPUT_SEPARATOR = "\n\n"
MAX_DEFAULT_CHUNK_TOKENS = 1024
MAX_DEFAULT_MAP_TOKENS = 128
MIN_DEFAULT_MAP_TOKENS = 8


@dataclass
class MapReducePlan:
    chunks: list[str]
    map_template: str
    reduce_template: str
    map_sampling: common_pb2.SamplingParams

    def map_prompt(self, chunk: str) -> str:
        return self.map_template.replace(CHUNK_PLACEHOLDER, chunk)

    def reduce_prompt(self, map_outputs: list[str]) -> str:
        """The map outputs, each stripped of surrounding whitespace, in chunk order, a blank line apart."""
        joined = OUTPUT_SEPARATOR.join(output.strip() for output in map_outputs)
        return self.reduce_template.replace(OUTPUTS_PLACEHOLDER, joined)


def plan_map_reduce(
    text: str,
    map_template: str,
    reduce_template: str,
    chunk_tokens: int,
    map_sampling: common_pb2.SamplingParams,
    reduce_max_tokens: int,
    tokenizer: ModelTokenizer,
    context_length: int,
    max_chunks: int,
) -> MapReducePlan:
    """Splits the text and settles the map's max_tokens so that every map prompt and the reduce fit the context.

    Raises INVALID_ARGUMENT naming the field to change when they cannot.
    """
    violations = template_violations(map_template, reduce_template)
    if violations:
        raise invalid_argument(violations)
    map_template = map_template or DEFAULT_MAP_TEMPLATE
    reduce_template = reduce_template or DEFAULT_REDUCE_TEMPLATE

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    # Special tokens (BOS) and the template around the chunk; +2 for tokens merging across the joins.
    map_overhead = len(tokenizer.encode(map_template.replace(CHUNK_PLACEHOLDER, ""))) + 2
    reduce_overhead = len(tokenizer.encode(reduce_template.replace(OUTPUTS_PLACEHOLDER, ""))) + 2
    explicit_map_tokens = map_sampling.max_tokens if map_sampling.HasField("max_tokens") else None
    room = context_length - map_overhead - (explicit_map_tokens or MIN_DEFAULT_MAP_TOKENS)
    if chunk_tokens == 0:
        chunk_tokens = min(MAX_DEFAULT_CHUNK_TOKENS, room)
    if not 4 <= chunk_tokens <= room:
        raise invalid_argument(
            [
                (
                    "map_reduce.chunk_tokens",
                    f"must be between 4 and {max(room, 4)} (the context of {context_length} tokens minus the map "
                    f"template's {map_overhead} and the map's max_tokens), got {chunk_tokens}",
                )
            ]
        )
    # Bounded before the split, which tokenises every piece: a chunk holds at most chunk_tokens of the text's
    # tokens, so the whole text's count (one call) says how many chunks it makes at least.
    at_least = -(-count(text) // chunk_tokens)
    if at_least > max_chunks:
        why = _too_many_chunks(f"at least {at_least}", chunk_tokens, max_chunks)
        raise invalid_argument([("map_reduce.text", why)])
    chunks = split_text(text, count, chunk_tokens)
    if not chunks:
        raise invalid_argument([("map_reduce.text", "must hold some text")])
    if len(chunks) > max_chunks:
        raise invalid_argument([("map_reduce.text", _too_many_chunks(str(len(chunks)), chunk_tokens, max_chunks))])
    separator_tokens = count(OUTPUT_SEPARATOR) + 1
    reduce_room = context_length - reduce_max_tokens - reduce_overhead
    share = reduce_room // len(chunks) - separator_tokens
    sampling = common_pb2.SamplingParams()
    sampling.CopyFrom(map_sampling)
    if explicit_map_tokens is None:
        if share < MIN_DEFAULT_MAP_TOKENS:
            raise invalid_argument(
                [
                    (
                        "map_reduce.text",
                        f"splits into {len(chunks)} chunks; their summaries would get {max(share, 0)} tokens each "
                        f"in the reduce prompt (at least {MIN_DEFAULT_MAP_TOKENS} needed): raise "
                        "map_reduce.chunk_tokens, lower sampling.max_tokens or send less text",
                    )
                ]
            )
        sampling.max_tokens = min(MAX_DEFAULT_MAP_TOKENS, share)
    elif explicit_map_tokens > share:
        raise invalid_argument(
            [
                (
                    "map_reduce.map_sampling.max_tokens",
                    f"must be at most {max(share, 0)}: {len(chunks)} map outputs must fit the reduce prompt "
                    f"(the context of {context_length} tokens minus the reduce's max_tokens {reduce_max_tokens} "
                    "and its template)",
                )
            ]
        )
    return MapReducePlan(chunks, map_template, reduce_template, sampling)


def _too_many_chunks(chunks: str, chunk_tokens: int, max_chunks: int) -> str:
    return (
        f"splits into {chunks} chunks of at most {chunk_tokens} tokens; at most {max_chunks} map calls are allowed "
        "per request: raise map_reduce.chunk_tokens or send less text"
    )
