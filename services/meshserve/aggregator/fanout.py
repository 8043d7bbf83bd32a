"""Running a parent's sub-requests and merging their outputs into one stream (semantics: inference.proto).

Streamed groups pass their chunks through as they come (each already tagged with its output index
by the worker). Held groups gather each candidate whole, then send the chosen ones in one message
each. A failure either ends everything (fail_fast: the merge cancels every other sub-request) or
becomes that index's error message (best_effort). The last message carries the usage of the whole
request. Map-reduce runs the map groups first, then one reduce group over their outputs.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

from google.rpc import error_details_pb2

from meshserve.aggregator.mapreduce import MapReducePlan
from meshserve.aggregator.merge import merge_batches
from meshserve.aggregator.plan import Group, candidate_requests
from meshserve.aggregator.ranking import Candidate, choose
from meshserve.common.errors import MeshError
from meshserve.common.stream_chunks import joined
from meshserve.common.tokenizer import ModelTokenizer
from meshserve.common.usage import token_usage
from meshserve.v1 import common_pb2

RunSubRequest = Callable[[common_pb2.TokenRequest], AsyncIterator[common_pb2.StreamChunk]]


@dataclass
class Totals:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0

    def usage(self) -> common_pb2.Usage:
        return token_usage(self.prompt_tokens, self.completion_tokens, self.cached_prompt_tokens)


@dataclass
class _GroupState:
    group: Group
    label: str  # how errors name the input, e.g. "batch.inputs[3]"
    candidates: list[Candidate]
    sent: int = 0  # output positions used so far (held groups)
    sent_tokens: set[tuple[int, ...]] = field(default_factory=set)
    cached_prompt_tokens: int = 0


class FanOut:
    def __init__(
        self,
        parent: common_pb2.TokenRequest,
        run_sub_request: RunSubRequest,
        *,
        best_effort: bool = False,
        dedupe: bool = False,
        order_by_score: bool = False,
    ) -> None:
        self.parent = parent
        self.run_sub_request = run_sub_request
        self.best_effort = best_effort
        self.dedupe = dedupe
        self.order_by_score = order_by_score
        self.totals = Totals()

    def is_held(self, n: int, best_of: int) -> bool:
        return best_of > n or self.dedupe or self.order_by_score

    async def run(self, groups: list[Group], labels: list[str]) -> AsyncIterator[common_pb2.StreamChunk]:
        """Every group's outputs, merged, then the final message."""
        async for message in self.run_groups(groups, labels, tag=""):
            yield message
        yield self.final()

    def final(self) -> common_pb2.StreamChunk:
        return common_pb2.StreamChunk(final=True, usage=self.totals.usage())

    async def run_groups(
        self, groups: list[Group], labels: list[str], tag: str
    ) -> AsyncIterator[common_pb2.StreamChunk]:
        states: list[_GroupState] = []
        owners: list[tuple[_GroupState, int]] = []  # sub-request position -> (its group, candidate number)
        requests: list[common_pb2.TokenRequest] = []
        for group, label in zip(groups, labels, strict=True):
            subs = candidate_requests(self.parent, group, tag=f"{tag}{group.input_index}-")
            state = _GroupState(group, label, [Candidate(j) for j in range(len(subs))])
            states.append(state)
            owners += [(state, j) for j in range(len(subs))]
            requests += subs
            self.totals.prompt_tokens += len(group.prompt_token_ids)
        streams = [self._sub_stream(position, request, owners[position]) for position, request in enumerate(requests)]
        try:
            async for batch in merge_batches(streams):
                for position, item in _coalesced(batch):
                    state, number = owners[position]
                    candidate = state.candidates[number]
                    if isinstance(item, MeshError):
                        candidate.fail(item)
                        self.totals.completion_tokens += len(candidate.token_ids)
                        for message in self._failed(state, candidate):
                            yield message
                        continue
                    if state.group.held:
                        candidate.add(item)
                    else:
                        candidate.token_ids.extend(item.token_ids)  # counted for usage should it fail later
                        if item.finish_reason:
                            candidate.finish_reason, candidate.usage = item.finish_reason, item.usage
                        yield item
                    if item.finish_reason:
                        self.totals.completion_tokens += item.usage.completion_tokens
                        state.cached_prompt_tokens = max(state.cached_prompt_tokens, item.usage.cached_prompt_tokens)
                        if state.group.held:
                            for message in self._decided(state, candidate):
                                yield message
        finally:
            self.totals.cached_prompt_tokens += sum(s.cached_prompt_tokens for s in states)

    async def _sub_stream(
        self, position: int, request: common_pb2.TokenRequest, owner: tuple[_GroupState, int]
    ) -> AsyncIterator[tuple[int, common_pb2.StreamChunk | MeshError]]:
        """One sub-request's chunks tagged with its position; its failure relabelled with the input it served."""
        try:
            async for chunk in self.run_sub_request(request):
                yield position, chunk
        except MeshError as exc:
            state, number = owner
            error = _relabel(exc, state, number)
            if not self.best_effort:
                raise error from exc
            yield position, error

    def _failed(self, state: _GroupState, candidate: Candidate) -> list[common_pb2.StreamChunk]:
        group = state.group
        if not group.held:
            return [self._error_message(group, group.first_index + candidate.number, candidate)]
        if self.is_ranking(group):
            return self._decided(state, candidate)
        position, state.sent = state.sent, state.sent + 1
        return [self._error_message(group, group.first_index + position, candidate)]

    def is_ranking(self, group: Group) -> bool:
        return group.best_of > group.n or self.order_by_score

    def _decided(self, state: _GroupState, finished: Candidate) -> list[common_pb2.StreamChunk]:
        """Held outputs that can be sent now that `finished` ended: all of a ranked group once every candidate
        has ended; with dedupe alone, this candidate at once unless it repeats one already sent."""
        group = state.group
        if not self.is_ranking(group):
            key = tuple(finished.token_ids)
            if self.dedupe and key in state.sent_tokens:
                return []
            state.sent_tokens.add(key)
            position, state.sent = state.sent, state.sent + 1
            return [self._held_message(group, group.first_index + position, finished)]
        if not all(c.done for c in state.candidates):
            return []
        chosen = choose(state.candidates, group.n, self.dedupe)
        messages = [self._held_message(group, group.first_index + j, c) for j, c in enumerate(chosen)]
        failed = [c for c in state.candidates if c.error is not None]
        for j, candidate in zip(range(len(chosen), group.n), failed, strict=False):
            messages.append(self._error_message(group, group.first_index + j, candidate))
        return messages

    def _held_message(self, group: Group, index: int, candidate: Candidate) -> common_pb2.StreamChunk:
        assert candidate.usage is not None
        message = common_pb2.StreamChunk(
            index=index,
            token_ids=candidate.token_ids,
            text=candidate.text,
            finish_reason=candidate.finish_reason,
            usage=candidate.usage,
            logprobs=candidate.logprobs if group.sampling.logprobs else (),
        )
        if math.isfinite(candidate.mean_logprob):
            message.mean_logprob = candidate.mean_logprob
        return message

    def _error_message(self, group: Group, index: int, candidate: Candidate) -> common_pb2.StreamChunk:
        assert candidate.error is not None
        return common_pb2.StreamChunk(
            index=index,
            finish_reason=common_pb2.FINISH_REASON_ERROR,
            usage=token_usage(len(group.prompt_token_ids), len(candidate.token_ids)),
            error=candidate.error.error_status(),
        )

    async def map_reduce(
        self,
        plan: MapReducePlan,
        tokenizer: ModelTokenizer,
        reduce_sampling: common_pb2.SamplingParams,
        n: int,
        best_of: int,
    ) -> AsyncIterator[common_pb2.StreamChunk]:
        """Every chunk's map call at once; then the reduce over their outputs, streamed as index 0 (.. n - 1)."""
        count = len(plan.chunks)
        groups = [
            Group(i, tokenizer.encode(plan.map_prompt(chunk)), plan.map_sampling) for i, chunk in enumerate(plan.chunks)
        ]
        labels = [f"map chunk {i} of {count}" for i in range(count)]
        outputs: list[list[str] | None] = [[] for _ in groups]
        failures: list[common_pb2.ErrorStatus] = []
        async for message in self.run_groups(groups, labels, tag="map"):
            chunk_number = message.index
            if message.HasField("error"):
                outputs[chunk_number] = None
                error = common_pb2.ErrorStatus()
                error.CopyFrom(message.error)
                error.map_chunk = chunk_number
                failures.append(error)
                yield common_pb2.StreamChunk(index=0, error=error)
            else:
                texts = outputs[chunk_number]
                assert texts is not None
                texts.append(message.text)
        mapped = ["".join(texts) for texts in outputs if texts is not None]
        if not mapped:
            first = MeshError.of_status(failures[0])  # its details too: a BadRequest still names the field
            raise MeshError(first.code, f"every map call failed; the first: {first.message}", first.details)
        reduce_ids = tokenizer.encode(plan.reduce_prompt(mapped))
        reduce = Group(0, reduce_ids, reduce_sampling, n, best_of, held=self.is_held(n, best_of))
        async for message in self.run_groups([reduce], ["the reduce"], tag="reduce"):
            yield message
        yield self.final()


def _coalesced(
    batch: list[tuple[int, common_pb2.StreamChunk | MeshError]],
) -> Iterator[tuple[int, common_pb2.StreamChunk | MeshError]]:
    """The chunks of each sub-request that were ready together, joined into one; its failure after them."""
    by_position: dict[int, list[common_pb2.StreamChunk | MeshError]] = {}
    for position, item in batch:
        by_position.setdefault(position, []).append(item)
    for position, items in by_position.items():
        chunks: list[common_pb2.StreamChunk] = []
        for item in items:
            if isinstance(item, MeshError):
                if chunks:
                    yield position, joined(chunks)
                    chunks = []
                yield position, item
            else:
                chunks.append(item)
        if chunks:
            yield position, joined(chunks)


def _relabel(error: MeshError, state: _GroupState, number: int) -> MeshError:
    """The sub-request's error, saying which input (and candidate) failed; field violations under the input."""
    group = state.group
    which = state.label
    if group.best_of > 1:
        which += f" (candidate {number}, seed + {number})" if group.held else f" (index {group.first_index + number})"
    details = []
    message = error.message
    for detail in error.details:
        if isinstance(detail, error_details_pb2.BadRequest) and state.label.startswith("batch."):
            renamed = error_details_pb2.BadRequest()
            for violation in detail.field_violations:
                renamed.field_violations.add(
                    field=f"{state.label}.{violation.field}", description=violation.description
                )
            detail = renamed
            # The message names the fields as the details do, so a caller can match one to the other.
            message = "; ".join(f"{v.field}: {v.description}" for v in renamed.field_violations)
        details.append(detail)
    return MeshError(error.code, f"{which} failed: {message}", details)
