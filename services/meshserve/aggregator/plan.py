"""Fan-out planning: which sub-requests a parent becomes, with which seeds, and at which output index.

A parent is a list of groups, one per input (a single prompt, each prompt of a batch, each map
chunk, the reduce). A group generates `best_of` candidates and returns `n` completions; the
completion j of group i has output index i * n + j. Candidate j uses seed + j, so it equals the
same input sent alone with that seed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from meshserve.v1 import common_pb2

SEED_MODULUS = 2**64


@dataclass
class Group:
    input_index: int
    prompt_token_ids: list[int]
    sampling: common_pb2.SamplingParams
    n: int = 1
    best_of: int = 1
    # Candidates are held until decided (ranked, deduped) instead of streamed as they come.
    held: bool = False

    def __post_init__(self) -> None:
        assert 1 <= self.n <= self.best_of, f"need 1 <= n ({self.n}) <= best_of ({self.best_of})"
        assert self.held or self.n == self.best_of, "choosing among candidates needs them held"

    @property
    def first_index(self) -> int:
        return self.input_index * self.n


def base_seed(sampling: common_pb2.SamplingParams) -> int:
    """The request's seed, else a random one, so the candidates of an unseeded request still differ."""
    return sampling.seed if sampling.HasField("seed") else int.from_bytes(os.urandom(8), "little")


def candidate_requests(parent: common_pb2.TokenRequest, group: Group, tag: str) -> list[common_pb2.TokenRequest]:
    """The group's sub-requests: the parent's model, priority, tenant, cache salt and label, the group's prompt
    and sampling, seed + j for candidate j, and parent_id so the router shows them as the parent's children.

    A streamed candidate carries its output index (echoed on its chunks); a held one its candidate number.
    Held candidates always ask for log-probabilities: they are the score.
    """
    seed = base_seed(group.sampling)
    subs = []
    for j in range(group.best_of):
        sub = common_pb2.TokenRequest(
            request_id=f"{parent.request_id}/{tag}{j}",
            model=parent.model,
            prompt_token_ids=group.prompt_token_ids,
            sampling=group.sampling,
            priority=parent.priority,
            tenant=parent.tenant,
            index=j if group.held else group.first_index + j,
            parent_id=parent.request_id,
            client_request_id=parent.client_request_id,
            cache_salt=parent.cache_salt,
        )
        sub.sampling.seed = (seed + j) % SEED_MODULUS
        if group.held:
            sub.sampling.logprobs = True
        subs.append(sub)
    return subs
