"""Choosing the next token of each sampling sequence from its logits, and the log-probabilities asked for.

Order per sequence: penalties (repetition, presence, frequency), then the stop tokens masked
while it is short of min_tokens, then greedy argmax, or
temperature, top-k, top-p and min-p followed by a draw from the sequence's own generator,
so a seeded sequence draws the same numbers whatever it is batched with. Log-probabilities
are of the model's raw distribution (before penalties, temperature and truncation).
"""

from __future__ import annotations

import os

import torch

from meshserve.worker.sequence import SamplingOptions, Sequence, TokenLogprob


def make_generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
    return generator


def resumed_generator(seed: int | None, draws: int, vocab_size: int) -> torch.Generator:
    """The generator of a seeded sequence that already drew `draws` tokens elsewhere (failover).

    Each draw is one multinomial sample over the whole vocabulary, whose use of the generator
    depends on the vocabulary's size but not on the probabilities, so replaying as many draws
    over a uniform distribution of that size reaches the same state.
    """
    generator = make_generator(seed)
    dummy = torch.ones(vocab_size)
    for _ in range(draws):
        torch.multinomial(dummy, 1, generator=generator)
    return generator


def sample(logits: torch.Tensor, sequences: list[Sequence]) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits: [len(sequences), vocab] float32. Returns one token and one optional logprob per sequence."""
    raw = logits
    masked = min_tokens_mask(sequences, logits.shape[-1], logits.device)
    if masked is not None or any(s.options.penalized for s in sequences):
        logits = logits.clone()
        for row, sequence in enumerate(sequences):
            if sequence.options.penalized:
                apply_penalties(logits[row], sequence.prompt_ids, sequence.output_ids, sequence.options)
    if masked is not None:
        logits[masked] = float("-inf")
    tokens = torch.argmax(logits, dim=-1).tolist()
    for row, sequence in enumerate(sequences):
        if not sequence.options.greedy:
            if sequence.generator is None:
                sequence.generator = make_generator(sequence.options.seed)
            tokens[row] = draw(logits[row], sequence.options, sequence.generator)
    logprobs: list[TokenLogprob | None] = [None] * len(sequences)
    rows = [row for row, s in enumerate(sequences) if s.options.logprobs]
    if rows:
        all_logprobs = torch.log_softmax(raw[rows], dim=-1)
        for i, row in enumerate(rows):
            logprobs[row] = token_logprob(all_logprobs[i], tokens[row], sequences[row].options.top_logprobs)
    return tokens, logprobs


def min_tokens_mask(
    sequences: list[Sequence], vocab_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(rows, token ids) to mask in one indexing of the batch's logits: the tokens that would stop each
    sequence short of min_tokens. None when no sequence is.

    A sequence whose stop tokens cover the whole vocabulary is left unmasked (its min_tokens cannot be met
    by masking; its stop checks still wait for min_tokens): an all -inf row would fail the whole batch.
    """
    rows: list[int] = []
    ids: list[int] = []
    for row, sequence in enumerate(sequences):
        masked = sequence.masked_token_ids
        if masked and len(masked) < vocab_size:
            rows += [row] * len(masked)
            ids += masked
    if not rows:
        return None
    return torch.tensor(rows, device=device), torch.tensor(ids, device=device)


def apply_penalties(
    logits: torch.Tensor, prompt_ids: list[int], output_ids: list[int], options: SamplingOptions
) -> None:
    """In place on one row: repetition over prompt and output; presence and frequency over the output."""
    if options.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long)
        scores = logits[seen]
        logits[seen] = torch.where(scores > 0, scores / options.repetition_penalty, scores * options.repetition_penalty)
    if output_ids and (options.presence_penalty or options.frequency_penalty):
        counts = torch.bincount(torch.tensor(output_ids, dtype=torch.long), minlength=logits.numel()).to(logits.dtype)
        logits -= options.frequency_penalty * counts + options.presence_penalty * (counts > 0).to(logits.dtype)


def draw(logits: torch.Tensor, options: SamplingOptions, generator: torch.Generator) -> int:
    """One row: temperature, then top-k, top-p and min-p truncation, then a draw."""
    scores = logits / options.temperature
    if 0 < options.top_k < scores.numel():
        kth_best = torch.topk(scores, options.top_k).values[-1]
        scores = scores.masked_fill(scores < kth_best, float("-inf"))
    if options.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        sorted_probs = torch.softmax(sorted_scores, dim=-1)
        # Drop a token when the tokens before it already reach top_p; the most likely token always stays.
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= options.top_p
        scores = scores.masked_fill(torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if options.min_p > 0.0:
        probs = probs.masked_fill(probs < options.min_p * probs.max(), 0.0)
    return int(torch.multinomial(probs, 1, generator=generator))


def token_logprob(logprobs: torch.Tensor, token_id: int, top: int) -> TokenLogprob:
    alternatives: tuple[tuple[int, float], ...] = ()
    if top:
        values, ids = torch.topk(logprobs, top)
        alternatives = tuple(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token_id, float(logprobs[token_id]), alternatives)
