"""min_tokens in the sampler: while a sequence is short of it, the tokens that would stop it cannot be drawn,
whatever else is in the batch; log-probabilities stay those of the model's raw distribution."""

from __future__ import annotations

import pytest
import torch

from meshserve.common.tokenizer import ModelTokenizer
from meshserve.worker.sampler import sample
from meshserve.worker.sequence import SamplingOptions, Sequence

EOS, STOP, BEST_OTHER = 1, 9, 42
VOCAB = 64


def sequence(model_dir, output_ids: tuple[int, ...] = (), **options) -> Sequence:
    tokenizer = ModelTokenizer.from_dir(model_dir)
    prompt = tokenizer.encode("Say:")
    made = Sequence(
        request_id="r",
        prompt_ids=prompt,
        options=SamplingOptions(**{"max_tokens": 100, "temperature": 0.0, "stop_token_ids": (STOP,), **options}),
        detokenizer=tokenizer.detokenizer(prompt),
        eos_token_ids=frozenset({EOS}),
        max_context_length=2048,
        emit=lambda output: None,
    )
    made.output_ids = list(output_ids)
    return made


def stopping_logits(rows: int) -> torch.Tensor:
    """EOS most likely, then the stop token, then BEST_OTHER."""
    logits = torch.zeros(rows, VOCAB)
    logits[:, EOS], logits[:, STOP], logits[:, BEST_OTHER] = 10.0, 9.0, 8.0
    return logits


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_eos_and_stop_token_ids_are_masked_only_for_sequences_short_of_min_tokens(model_dir, device):
    batch = [
        sequence(model_dir, min_tokens=3),
        sequence(model_dir),
        sequence(model_dir, output_ids=(5, 5, 5), min_tokens=3),
        sequence(model_dir, output_ids=(5, 5), min_tokens=3),
    ]
    tokens, _ = sample(stopping_logits(len(batch)).to(device), batch)  # the mask is built where the logits are
    assert tokens == [BEST_OTHER, EOS, EOS, BEST_OTHER], tokens


def test_ignore_eos_leaves_eos_drawable_but_stop_tokens_masked(model_dir):
    tokens, _ = sample(stopping_logits(1), [sequence(model_dir, min_tokens=2, ignore_eos=True)])
    assert tokens == [EOS]
    logits = stopping_logits(1)
    logits[0, EOS] = 0.0
    tokens, _ = sample(logits, [sequence(model_dir, min_tokens=2, ignore_eos=True)])
    assert tokens == [BEST_OTHER], "a stop token id was drawn before min_tokens"


def test_a_sampling_sequence_never_draws_a_masked_token(model_dir):
    seeded = sequence(model_dir, min_tokens=1000, temperature=1.0, seed=3)
    logits = stopping_logits(1)
    logits[0, EOS] = logits[0, STOP] = 30.0  # all but certain unmasked
    drawn = set()
    for _ in range(50):
        token, _ = sample(logits, [seeded])
        drawn.add(token[0])
        seeded.output_ids.append(token[0])
    assert not drawn & {EOS, STOP}, drawn


def test_logprobs_are_of_the_raw_distribution_not_the_masked_one(model_dir):
    asking = sequence(model_dir, min_tokens=2, logprobs=True, top_logprobs=2)
    tokens, logprobs = sample(stopping_logits(1), [asking])
    assert tokens == [BEST_OTHER]
    assert [token for token, _ in logprobs[0].top] == [EOS, STOP]
    raw = torch.log_softmax(stopping_logits(1)[0], -1)[BEST_OTHER].item()
    assert logprobs[0].logprob == pytest.approx(raw, abs=1e-6)


def test_stop_tokens_covering_the_whole_vocabulary_fail_nothing(model_dir):
    """Masking every token would leave nothing to draw; the batch must go on, the other sequence masked."""
    everything = sequence(model_dir, min_tokens=2, stop_token_ids=tuple(range(VOCAB)))
    tokens, _ = sample(stopping_logits(2), [everything, sequence(model_dir, min_tokens=2)])
    assert tokens == [EOS, BEST_OTHER]
