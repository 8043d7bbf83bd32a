"""Choosing the next token of each sampling sequence from its logits, and the log-probabilities asked for.

Order per sequence: penalties (repetition over prompt and output, then presence and frequency over the
output), then the stop tokens masked while it is short of min_tokens, then a constrained sequence's grammar
mask (worker/grammar.py: every token its grammar does not allow next is -inf), then greedy argmax for temperature 0,
or temperature, top-k, top-p and min-p followed by a draw. Log-probabilities are of the model's raw
distribution (before penalties, temperature and truncation).

The whole batch is a handful of tensor operations on the logits' device: an all-greedy batch costs one
argmax; penalties, the sort for top-k/top-p and min-p run only over the rows that ask for them. A draw is
an exponential race, argmax(weights / Exponential(1)): the method torch.multinomial uses for one sample,
without its checks, which raise for the whole batch when one row is bad. A seeded row takes its noise from its
own generator, one vector of `vocab` values per draw whatever the weights, so it draws the same tokens
whatever it is batched with and `resumed_generator` can replay its state; unseeded rows share one draw.

Hostile values affect only their own row and never raise:
- temperature: NaN or <= 0 is greedy; otherwise it is clamped into [float32 tiny, float32 max] and applied
  to the logits minus their row maximum, so the best token keeps weight exactly 1 and a tiny temperature
  gives its limit (greedy, uniform among exact ties) instead of inf/nan.
- a sampled row whose logits (after penalties and mask) hold +inf, or are all -inf/NaN, takes its greedy
  token: argmax with NaN read as -inf (the first +inf token, else token 0 when nothing is finite).
  NaN entries of an otherwise finite row are never drawn.
- top_k outside (0, vocab) is off; top_p >= 1 (or NaN) is off, top_p <= 0 keeps the best token only;
  min_p 1 keeps the best tokens only, above 1 nothing, so the row falls back to its greedy token.
- after truncation, a row with no positive weight left falls back to its greedy token.
- huge or tiny penalties may push scores to +-inf; that row is then handled as above.
- a greedy row is exactly argmax of its penalised, masked logits, NaN included (argmax picks a NaN).
- log-probabilities of a row with non-finite logits read NaN as -inf.
"""

from __future__ import annotations

import os
from itertools import chain

import torch

from meshserve.worker.grammar import allowed_tokens
from meshserve.worker.sequence import SamplingOptions, Sequence, TokenLogprob

INF, NEG_INF = float("inf"), float("-inf")
TINY = torch.finfo(torch.float32).tiny  # smallest normal float32: no subnormal or zero divisor
HUGE = torch.finfo(torch.float32).max
SEED_MODULUS = 1 << 64  # torch.Generator.manual_seed takes 64-bit seeds; any int maps into them

# One generator per device for unseeded rows, seeded from the OS so they never follow torch's global seed.
_shared_generators: dict[torch.device, torch.Generator] = {}


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on `device` (where the logits are: a CPU generator cannot feed a CUDA draw)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed % SEED_MODULUS if seed is not None else int.from_bytes(os.urandom(8), "little"))
    return generator


def resumed_generator(
    seed: int | None, draws: int, vocab_size: int, device: torch.device | str = "cpu"
) -> torch.Generator:
    """The generator of a seeded sequence that already drew `draws` tokens elsewhere (failover).

    Every draw takes exactly one `exponential_noise` vector of the vocabulary's size, whatever the
    probabilities, so replaying as many reaches the same state. An unseeded stream has nothing to
    reproduce: it gets a fresh generator without replay.
    """
    generator = make_generator(seed, device)
    if seed is not None:
        for _ in range(draws):
            exponential_noise(vocab_size, generator)
    return generator


def exponential_noise(vocab_size: int, generator: torch.Generator, out: torch.Tensor | None = None) -> torch.Tensor:
    """The only use of a sequence's generator: one draw's Exponential(1) noise, `vocab_size` float32 values,
    into `out` (a contiguous row) where it is on the generator's device, else a new tensor there."""
    if out is None or out.device != generator.device:
        out = torch.empty(vocab_size, device=generator.device)
    return out.exponential_(generator=generator)


def sample(logits: torch.Tensor, sequences: list[Sequence]) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits: [len(sequences), vocab] float32. Returns one token and one optional logprob per sequence."""
    device, vocab = logits.device, logits.shape[-1]
    options = [s.options for s in sequences]
    penalized = [row for row, o in enumerate(options) if o.penalized]
    masked = min_tokens_mask(sequences, vocab, device)
    constrained = [row for row, s in enumerate(sequences) if s.matcher is not None]
    scores = logits
    if penalized or masked is not None or constrained:
        scores = logits.clone()  # the raw logits stay for the log-probabilities
        if penalized:
            rows = torch.tensor(penalized, device=device)
            scores[rows] = penalize(
                scores[rows],
                [sequences[r].prompt_ids for r in penalized],
                [sequences[r].output_ids for r in penalized],
                [options[r] for r in penalized],
            )
        if masked is not None:
            scores[masked] = NEG_INF
        if constrained:
            # Last: a grammar's mask is the final word on what may come next.
            allowed = allowed_tokens([sequences[r].matcher for r in constrained], vocab, device)
            if len(constrained) == len(sequences):
                scores.masked_fill_(~allowed, NEG_INF)
            else:
                rows = torch.tensor(constrained, device=device)
                scores[rows] = scores[rows].masked_fill(~allowed, NEG_INF)
    # `> 0` also sends NaN and negative temperatures to the greedy path.
    sampled = [row for row, o in enumerate(options) if o.temperature > 0.0]
    if len(sampled) < len(sequences) or not sampled:
        tokens = scores.argmax(dim=-1)
    if sampled:
        for row in sampled:
            sequence = sequences[row]
            if sequence.generator is None and sequence.options.seed is not None:
                sequence.generator = make_generator(sequence.options.seed, device)
        generators = [sequences[r].generator for r in sampled]
        if len(sampled) == len(sequences):
            tokens = draw_rows(scores, options, generators)
        else:
            rows = torch.tensor(sampled, device=device)
            tokens[rows] = draw_rows(scores[rows], [options[r] for r in sampled], generators)
    asking = [row for row, o in enumerate(options) if o.logprobs]
    logprobs: list[TokenLogprob | None] = [None] * len(sequences)
    if asking:
        for row, logprob in zip(asking, token_logprobs(logits, tokens, asking, options), strict=True):
            logprobs[row] = logprob
    return tokens.tolist(), logprobs


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


def penalize(
    scores: torch.Tensor,
    prompts: list[list[int]],
    outputs: list[list[int]],
    options: list[SamplingOptions],
) -> torch.Tensor:
    """The penalised copy of scores [rows, vocab], all rows at once: repetition over the tokens seen in
    prompt and output (divides positive scores, multiplies negative ones), then presence and frequency
    subtracted from the tokens of the output. Only touched tokens change, so a zero penalty times an
    infinite one never makes NaN of an unseen token."""
    rows, vocab = scores.shape
    device = scores.device
    repeats = [o.repetition_penalty != 1.0 for o in options]
    counted = [o.presence_penalty != 0.0 or o.frequency_penalty != 0.0 for o in options]
    seen_lists = [list(chain(p, o)) if r else [] for p, o, r in zip(prompts, outputs, repeats, strict=True)]
    out_lists = [list(o) if c else [] for o, c in zip(outputs, counted, strict=True)]
    lengths = [len(ids) for ids in seen_lists + out_lists]
    ids = torch.tensor(list(chain(*seen_lists, *out_lists)), dtype=torch.long, device=device)
    row_of = torch.arange(rows, device=device).repeat(2)
    row_of = row_of.repeat_interleave(torch.tensor(lengths, device=device), output_size=ids.numel())
    flat = row_of * vocab + ids
    num_seen = sum(lengths[:rows])
    params = torch.tensor(
        [[o.repetition_penalty, o.presence_penalty, o.frequency_penalty] for o in options],
        dtype=scores.dtype,
        device=device,
    )
    repetition, presence, frequency = (column[:, None] for column in params.unbind(dim=1))
    penalized = scores
    if any(repeats):
        seen = torch.zeros(rows * vocab, dtype=torch.bool, device=device)
        seen = seen.index_fill_(0, flat[:num_seen], True).view(rows, vocab)
        repeated = torch.where(scores > 0, scores / repetition, scores * repetition)
        penalized = torch.where(seen, repeated, scores)
    if any(counted):
        counts = torch.zeros(rows * vocab, dtype=scores.dtype, device=device)
        counts = counts.index_add_(0, flat[num_seen:], torch.ones_like(flat[num_seen:], dtype=scores.dtype))
        counts = counts.view(rows, vocab)
        penalized = torch.where(counts > 0, penalized - (frequency * counts + presence), penalized)
    return penalized


def draw_rows(
    scores: torch.Tensor, options: list[SamplingOptions], generators: list[torch.Generator | None]
) -> torch.Tensor:
    """One token per row of scores [rows, vocab]: temperature, top-k, top-p and min-p, then an exponential
    race; rows with a generator take their noise from it, the others share one draw. A row with nothing
    finite to draw from, or nothing left after truncation, takes its greedy token."""
    rows, vocab = scores.shape
    device = scores.device
    finite_or_inf = scores.nan_to_num(nan=NEG_INF, posinf=INF, neginf=NEG_INF)  # a copy: the rest is in place
    best, greedy = finite_or_inf.max(dim=-1)
    top_ks = [o.top_k if 0 < o.top_k < vocab else vocab for o in options]
    # A top_p of 2 is "off" even when rounding makes the mass before the last token reach 1.
    top_ps = [o.top_p if o.top_p < 1.0 else 2.0 for o in options]
    min_ps = [o.min_p if o.min_p > 0.0 else 0.0 for o in options]  # NaN is off, as alone
    params = torch.tensor([[o.temperature for o in options], top_ps, min_ps], dtype=torch.float64, device=device)
    temperature, min_p = params[0].float(), params[2].float()
    top_p = params[1]  # float64, as the mass it is compared with
    # Minus the row's best, every score is <= 0 and the best is exactly 0: weights lie in [0, 1], the best 1.
    weights = finite_or_inf.sub_(best[:, None]).div_(temperature.clamp(TINY, HUGE)[:, None]).exp_()
    weights.masked_fill_(~best.isfinite()[:, None], 0.0)  # +inf or nothing finite: the greedy token
    cut = [row for row, o in enumerate(options) if top_ks[row] < vocab or o.top_p < 1.0]
    if len(cut) == rows:
        weights = truncate(weights, top_ks, top_p)
    elif cut:
        index = torch.tensor(cut, device=device)
        weights[index] = truncate(weights[index], [top_ks[r] for r in cut], top_p[index])
    if any(min_ps):
        # The best token's weight is 1, so min_p * (best probability) is min_p in weights.
        weights.masked_fill_(weights < min_p[:, None], 0.0)
    noise = torch.empty_like(weights)
    if any(generator is None for generator in generators):
        noise.exponential_(generator=shared_generator(device))
    for row, generator in enumerate(generators):
        if generator is not None:
            row_noise = exponential_noise(vocab, generator, out=noise[row])
            if row_noise.device != device:  # a generator left on another device still decides the draw
                noise[row] = row_noise
    # Exponential noise can be exactly 0 on the CPU: 0 / 0 would be NaN; clamped, a zero weight stays 0.
    race, drawn = weights.div_(noise.clamp_(min=TINY)).max(dim=-1)
    return torch.where(race > 0, drawn, greedy)


def truncate(weights: torch.Tensor, top_ks: list[int], top_p: torch.Tensor) -> torch.Tensor:
    """Top-k, then top-p over what top-k kept, on weights [rows, vocab] whose best is 1 (the top-k'th
    value kept; then tokens until the mass before them reaches top_p, the best always). Each row's cut
    becomes a weight threshold, so every token tied with the last one kept stays: the cut then depends
    on the sorted values only, never on how a sort orders ties. Rows that all have top_k need only a
    topk of the largest; otherwise one sort. Sums are float64 so the cut hardly depends on the order
    the device sums in, which can change with the batch."""
    vocab = weights.shape[-1]
    largest = max(top_ks)
    ordered = weights.topk(largest, dim=-1).values if largest < vocab else weights.sort(-1, descending=True).values
    kth = ordered.gather(1, torch.tensor(top_ks, device=weights.device)[:, None] - 1)
    in_top_k = ordered >= kth
    prefix = torch.where(in_top_k, ordered, 0.0).cumsum(dim=-1, dtype=torch.float64)
    total = prefix[:, -1:]
    if largest < vocab:  # tokens tied with the k-th past the candidates are in the top k too
        total = total + ((weights >= kth).sum(-1, keepdim=True) - in_top_k.sum(-1, keepdim=True)) * kth.double()
    # Token j > 0 stays while the mass of tokens 0..j-1 is short of top_p; a cumulative sum only grows, so
    # the kept tokens are a prefix of the order and their count names the threshold.
    kept = 1 + (in_top_k[:, 1:] & (prefix[:, :-1] < top_p[:, None] * total)).sum(dim=-1, keepdim=True)
    return weights.masked_fill_(weights < ordered.gather(1, kept - 1), 0.0)


def shared_generator(device: torch.device) -> torch.Generator:
    if device not in _shared_generators:
        _shared_generators[device] = make_generator(None, device)
    return _shared_generators[device]


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, asking: list[int], options: list[SamplingOptions]
) -> list[TokenLogprob]:
    """The raw log-probability of each asking row's token and its top alternatives, with one log_softmax
    and one topk over those rows. log_softmax is exact for finite rows; a non-finite row reads NaN as -inf."""
    device = logits.device
    index = torch.tensor(asking, device=device)
    logprobs = torch.log_softmax(logits[index], dim=-1)
    logprobs = torch.where(logprobs.isnan(), NEG_INF, logprobs)
    chosen_ids = tokens[index]
    chosen = logprobs.gather(1, chosen_ids[:, None])[:, 0].tolist()
    tops = [min(options[row].top_logprobs, logits.shape[-1]) for row in asking]
    top_values: list[list[float]] = [[] for _ in asking]
    top_ids: list[list[int]] = [[] for _ in asking]
    if max(tops) > 0:
        values, ids = logprobs.topk(max(tops), dim=-1)
        top_values, top_ids = values.tolist(), ids.tolist()
    return [
        TokenLogprob(token_id, logprob, tuple(zip(top_ids[i][:top], top_values[i][:top], strict=True)))
        for i, (token_id, logprob, top) in enumerate(zip(chosen_ids.tolist(), chosen, tops, strict=True))
    ]


def apply_penalties(
    logits: torch.Tensor, prompt_ids: list[int], output_ids: list[int], options: SamplingOptions
) -> None:
    """In place on one row: `penalize` for a single sequence."""
    logits.copy_(penalize(logits[None], [prompt_ids], [output_ids], [options])[0])


def draw(logits: torch.Tensor, options: SamplingOptions, generator: torch.Generator) -> int:
    """One row: `draw_rows` for a single sequence with its generator."""
    return int(draw_rows(logits[None], [options], [generator])[0])
