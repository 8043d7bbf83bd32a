"""The batched sampler on its own: greedy is argmax, truncation never draws a cut token, penalties are the
textbook ones, a seeded sequence draws the same tokens alone, in any batch and after failover, and hostile
values stay in their own row."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from meshserve.worker.sampler import penalize, resumed_generator, sample
from meshserve.worker.sequence import SamplingOptions, Sequence

VOCAB = 50
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def sequence(prompt: tuple[int, ...] = (3, 4, 5), output: tuple[int, ...] = (), **options) -> Sequence:
    made = Sequence(
        request_id="r",
        prompt_ids=list(prompt),
        options=SamplingOptions(**{"max_tokens": 1000, "temperature": 0.0, **options}),
        detokenizer=None,
        eos_token_ids=frozenset({1}),
        max_context_length=4096,
        emit=lambda output: None,
    )
    made.output_ids = list(output)
    return made


def step_logits(step: int, rows: int = 1, vocab: int = VOCAB) -> torch.Tensor:
    """Logits that change with the step but not with the batch: every row of a step is the same."""
    generator = torch.Generator().manual_seed(1000 + step)
    return (torch.randn(vocab, generator=generator) * 2).expand(rows, vocab).clone()


def run_steps(batches: list[list[Sequence]], device: str, vocab: int = VOCAB) -> None:
    """Samples each batch on its step's logits and appends the tokens, as the engine does."""
    for step, batch in enumerate(batches):
        tokens, _ = sample(step_logits(step, len(batch), vocab).to(device), batch)
        for seq, token in zip(batch, tokens, strict=True):
            seq.output_ids.append(token)


def drawn_alone(options: dict, steps: int, device: str = "cpu", vocab: int = VOCAB) -> list[int]:
    alone = sequence(**options)
    run_steps([[alone] for _ in range(steps)], device, vocab)
    return alone.output_ids


SEEDED = {"temperature": 0.9, "top_k": 20, "top_p": 0.9, "min_p": 0.02, "repetition_penalty": 1.3, "seed": 11}


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_rows_are_exactly_the_argmax_beside_sampled_ones(device):
    logits = torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(0)).to(device)
    batch = [sequence(), sequence(temperature=1.0, seed=1), sequence(), sequence(temperature=0.7), sequence()]
    batch.append(sequence(top_k=3, top_p=0.1, min_p=0.5))  # truncation is ignored by greedy rows
    tokens, logprobs = sample(logits, batch)
    argmax = logits.argmax(-1).tolist()
    assert [tokens[i] for i in (0, 2, 4, 5)] == [argmax[i] for i in (0, 2, 4, 5)]
    assert logprobs == [None] * 6
    assert batch[0].generator is None, "a greedy sequence needs no generator"


def test_all_greedy_batch_touches_no_generator():
    batch = [sequence() for _ in range(4)]
    logits = torch.randn(4, VOCAB)
    assert sample(logits, batch)[0] == logits.argmax(-1).tolist()
    assert all(s.generator is None for s in batch)


def truncated_draws(device: str, draws: int = 2000, **options) -> Counter:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])).expand(draws, 4).to(device)
    seed = options.pop("seed", None)  # seeded: one seed per row, or every row would draw the same
    options = {"temperature": 1.0, **options}
    batch = [sequence(**options, seed=seed + i if seed is not None else None) for i in range(draws)]
    return Counter(sample(logits, batch)[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("options", "allowed"),
    [
        ({}, {0, 1, 2, 3}),
        ({"top_k": 2}, {0, 1}),
        ({"top_k": 4}, {0, 1, 2, 3}),
        ({"top_p": 0.5}, {0}),
        ({"top_p": 0.85}, {0, 1, 2}),  # mass before token 2 is 0.8 < 0.85; before token 3, 0.95
        ({"min_p": 0.2}, {0, 1, 2}),  # 0.05 < 0.2 * 0.5
        ({"min_p": 0.35}, {0, 1}),  # 0.15 < 0.35 * 0.5
        ({"top_k": 3, "top_p": 0.7}, {0, 1}),  # within the top 3 (0.95): 0.5 / 0.95 < 0.7, 0.8 / 0.95 > 0.7
        ({"temperature": 0.01}, {0}),
        ({"seed": 5, "top_k": 2}, {0, 1}),
    ],
)
def test_truncated_tokens_are_never_drawn(device, options, allowed):
    counts = truncated_draws(device, **options)
    assert set(counts) == allowed, f"expected exactly {allowed} drawn, got {counts}"


@pytest.mark.parametrize("device", DEVICES)
def test_draws_follow_the_distribution(device):
    counts = truncated_draws(device, draws=8000)
    for token, probability in enumerate([0.5, 0.3, 0.15, 0.05]):
        assert counts[token] / 8000 == pytest.approx(probability, abs=0.02), counts
    counts = truncated_draws(device, draws=8000, top_k=2, temperature=2.0)
    expected = math.sqrt(0.5) / (math.sqrt(0.5) + math.sqrt(0.3))
    assert counts[0] / 8000 == pytest.approx(expected, abs=0.02), counts


def reference_penalties(row: list[float], prompt: list[int], output: list[int], o: SamplingOptions) -> list[float]:
    out = list(row)
    for token in set(prompt) | set(output):
        out[token] = out[token] / o.repetition_penalty if out[token] > 0 else out[token] * o.repetition_penalty
    for token, count in Counter(output).items():
        out[token] -= o.frequency_penalty * count + o.presence_penalty
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_penalties_equal_the_reference_computation(device):
    vocab = 10
    logits = torch.randn(5, vocab, generator=torch.Generator().manual_seed(2))
    cases = [
        ([0, 1], [2, 2, 3], SamplingOptions(max_tokens=1, repetition_penalty=2.0)),
        ([4], [5, 5, 5, 1], SamplingOptions(max_tokens=1, presence_penalty=0.5, frequency_penalty=0.25)),
        ([6, 7, 7], [7, 8], SamplingOptions(max_tokens=1, repetition_penalty=0.8, frequency_penalty=-0.5)),
        ([], [], SamplingOptions(max_tokens=1, repetition_penalty=1.5, presence_penalty=1.0)),
    ]
    got = penalize(logits[:4].to(device), [c[0] for c in cases], [c[1] for c in cases], [c[2] for c in cases])
    for row, (prompt, output, options) in enumerate(cases):
        expected = reference_penalties(logits[row].tolist(), prompt, output, options)
        assert got[row].tolist() == pytest.approx(expected, rel=1e-6), f"row {row}"
    # In sample, penalised greedy rows are the argmax of the penalised logits; others are untouched.
    batch = [sequence(p, o, **{"temperature": 0.0, **_penalties(opts)}) for p, o, opts in cases]
    tokens, _ = sample(logits.to(device), [*batch, sequence()])
    assert tokens == [*got.argmax(-1).tolist(), int(logits[4].argmax())]


def _penalties(options: SamplingOptions) -> dict:
    return {
        "repetition_penalty": options.repetition_penalty,
        "presence_penalty": options.presence_penalty,
        "frequency_penalty": options.frequency_penalty,
    }


@pytest.mark.parametrize("device", DEVICES)
def test_a_seeded_sequence_draws_the_same_tokens_alone_and_in_any_batch(device):
    steps = 40
    expected = drawn_alone(SEEDED, steps, device)
    batched, twin = sequence(**SEEDED), sequence(**SEEDED)
    batches = []
    for step in range(steps):
        others = [
            sequence(),
            sequence(temperature=1.0),
            sequence(temperature=1.2, seed=step, top_k=5),
            sequence(temperature=0.5, top_p=0.3, presence_penalty=0.7, output=(1, 2, 2)),
            sequence(temperature=1.0, min_p=0.3),
        ][: step % 6]
        batches.append([*others[: step % 3], batched, *others[step % 3 :], twin])
    run_steps(batches, device)
    assert batched.output_ids == expected, "a batch changed a seeded sequence's tokens"
    assert twin.output_ids == expected, "two sequences with one seed drew differently"
    assert len(set(expected)) > 5, f"the draws hardly vary: {expected}"


@pytest.mark.parametrize("device", DEVICES)
def test_a_resumed_generator_continues_the_same_stream(device):
    steps = 30
    expected = drawn_alone(SEEDED, steps, device)
    for done in (0, 1, 7, 29):
        resumed = sequence(**SEEDED)
        resumed.output_ids = expected[:done]
        resumed.generator = resumed_generator(SEEDED["seed"], done, VOCAB, device=device)
        assert resumed.generator.device.type == device
        for step in range(done, steps):
            tokens, _ = sample(step_logits(step).to(device), [resumed])
            resumed.output_ids.append(tokens[0])
        assert resumed.output_ids == expected, f"resumed after {done} tokens, the stream diverged"


def with_row(logits: torch.Tensor, values: dict[int, float] | float) -> torch.Tensor:
    logits = logits.clone()
    if isinstance(values, dict):
        for token, value in values.items():
            logits[2, token] = value
    else:
        logits[2] = values
    return logits


HOSTILE = [
    pytest.param({"temperature": 1e-44}, None, "argmax", id="temperature-1e-44"),
    pytest.param({"temperature": 1e-50}, None, "argmax", id="temperature-under-float32"),
    pytest.param({"temperature": 1e300}, None, None, id="temperature-over-float32"),
    pytest.param({"temperature": math.inf}, None, None, id="temperature-inf"),
    pytest.param({"temperature": math.nan}, None, "argmax", id="temperature-nan"),
    pytest.param({"temperature": -1.0}, None, "argmax", id="temperature-negative"),
    pytest.param({"temperature": 1.0, "repetition_penalty": 1e-30}, None, None, id="repetition-1e-30"),
    pytest.param({"temperature": 1.0, "repetition_penalty": 1e30}, None, None, id="repetition-1e30"),
    pytest.param({"repetition_penalty": 1e-30}, None, None, id="greedy-repetition-1e-30"),
    pytest.param({"temperature": 1.0, "repetition_penalty": 0.0}, None, None, id="repetition-0"),
    pytest.param({"temperature": 1.0, "repetition_penalty": math.nan}, None, None, id="repetition-nan"),
    pytest.param({"temperature": 1.0, "presence_penalty": -1e38, "frequency_penalty": -1e38}, None, 7, id="to-inf"),
    pytest.param({"temperature": 1.0, "frequency_penalty": 1e39}, None, None, id="frequency-inf"),
    pytest.param({"temperature": 1.0, "top_p": 1e-45}, None, "argmax", id="top_p-1e-45"),
    pytest.param({"temperature": 1.0, "top_p": 0.0}, None, "argmax", id="top_p-0"),
    pytest.param({"temperature": 1.0, "top_p": math.nan, "top_k": 3}, None, None, id="top_p-nan"),
    pytest.param({"temperature": 1.0, "min_p": 1.0}, None, "argmax", id="min_p-1"),
    pytest.param({"temperature": 1.0, "min_p": 2.0}, None, "argmax", id="min_p-2"),
    pytest.param({"temperature": 1.0, "min_p": math.nan}, None, None, id="min_p-nan"),
    pytest.param({"temperature": 1.0, "top_k": VOCAB + 5}, None, None, id="top_k-over-vocab"),
    pytest.param({"temperature": 1.0, "top_k": -3}, None, None, id="top_k-negative"),
    pytest.param({"temperature": 1.0, "seed": 2**70}, None, None, id="seed-over-64-bits"),
    pytest.param({"temperature": 1.0, "seed": -(2**70)}, None, None, id="seed-negative"),
    pytest.param({"temperature": 1.0}, {9: math.inf}, 9, id="one-inf-logit"),
    pytest.param({"temperature": 1.0}, {9: math.inf, 4: math.inf}, 4, id="two-inf-logits"),
    pytest.param({"temperature": 1.0, "top_k": 2}, {9: math.nan, 4: math.nan}, {4, 9}, id="some-nan"),
    pytest.param({"temperature": 1.0, "top_p": 0.9}, {i: -math.inf for i in range(40)}, None, id="mostly-neg-inf"),
    pytest.param({"temperature": 1.0}, math.nan, None, id="all-nan"),
    pytest.param({"temperature": 1.0, "top_p": 0.5}, -math.inf, None, id="all-neg-inf"),
    pytest.param({"temperature": 1.0, "min_p": 0.1}, math.inf, None, id="all-inf"),
    pytest.param({}, math.nan, None, id="greedy-all-nan"),
    pytest.param({"temperature": 1.0, "logprobs": True, "top_logprobs": 3}, 1e30, None, id="huge-finite"),
    pytest.param({"temperature": 1.0, "logprobs": True, "top_logprobs": VOCAB + 9}, math.nan, None, id="nan-lp"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("options", "row_values", "expected"), HOSTILE)
def test_a_hostile_row_affects_only_itself_and_raises_nothing(device, options, row_values, expected):
    steps = 5
    normal = [
        {},
        {"temperature": 1.0, "seed": 3, "logprobs": True, "top_logprobs": 2},
        None,  # the hostile row
        {"temperature": 0.8, "seed": 4, "top_p": 0.8, "repetition_penalty": 1.2, "min_p": 0.05},
        {"temperature": 1.0, "top_k": 4, "seed": 5},
    ]
    alone = [drawn_alone(o, steps, device) for o in normal if o is not None]
    batch = [sequence(output=(7, 7), **(o if o is not None else options)) for o in normal]
    for row in (0, 1, 3, 4):
        batch[row].output_ids = []
    for step in range(steps):
        logits = step_logits(step, len(batch))
        if row_values is not None:
            logits = with_row(logits, row_values)
        tokens, logprobs = sample(logits.to(device), batch)
        hostile = tokens[2]
        assert 0 <= hostile < VOCAB, f"the hostile row drew {hostile}"
        if expected == "argmax":
            assert hostile == int(logits[2].argmax())
        elif isinstance(expected, set):
            assert hostile not in expected, f"drew {hostile}, whose logit is NaN"
        elif expected is not None:
            assert hostile == expected
        for seq, token in zip(batch, tokens, strict=True):
            seq.output_ids.append(token)
        if logprobs[2] is not None:
            assert not math.isnan(logprobs[2].logprob)
            assert all(not math.isnan(v) for _, v in logprobs[2].top)
            if row_values == 1e30:  # a finite row, however extreme, has finite log-probabilities
                assert math.isfinite(logprobs[2].logprob)
        assert logprobs[1] is not None and math.isfinite(logprobs[1].logprob)
    together = [batch[row].output_ids for row in (0, 1, 3, 4)]
    assert together == alone, "a hostile row changed another row's tokens"


@CUDA
def test_generators_live_on_the_logits_device():
    seeded = sequence(temperature=1.0, seed=9)
    sample(torch.randn(1, VOCAB, device="cuda"), [seeded])
    assert seeded.generator.device.type == "cuda"
    assert resumed_generator(9, 3, VOCAB, device="cuda").device.type == "cuda"
    # A generator left on the CPU (an old resume) still feeds a CUDA draw, with the same tokens.
    on_cpu, on_cuda = sequence(temperature=1.0, seed=9), sequence(temperature=1.0, seed=9)
    on_cpu.generator = resumed_generator(9, 0, VOCAB)
    tokens, _ = sample(torch.zeros(2, VOCAB, device="cuda"), [on_cpu, on_cuda])
    assert 0 <= tokens[0] < VOCAB
