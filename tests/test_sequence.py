"""Stop conditions and streamed text of one sequence, on the built-in tokenizer."""

from __future__ import annotations

from meshserve.common.tokenizer import ModelTokenizer
from meshserve.worker.sequence import Finish, SamplingOptions, Sequence


def run(model_dir, text: str, **options) -> tuple[list, Sequence]:
    tokenizer = ModelTokenizer.from_dir(model_dir)
    prompt = tokenizer.encode("Say:")
    outputs = []
    sequence = Sequence(
        request_id="r",
        prompt_ids=prompt,
        options=SamplingOptions(**{"max_tokens": 100, **options}),
        detokenizer=tokenizer.detokenizer(prompt),
        eos_token_ids=frozenset({1}),
        max_context_length=2048,
        emit=outputs.append,
    )
    for token in tokenizer.encode(text, add_special_tokens=False):
        if sequence.finished:
            break
        sequence.append_token(token)
    return outputs, sequence


def test_stop_string_split_across_tokens_is_never_emitted(model_dir):
    outputs, sequence = run(model_dir, "the worker sends tokens to the router now", stop=("to the router",))
    assert "".join(o.text for o in outputs) == "the worker sends tokens "
    assert sequence.finish == Finish.STOP
    assert all("to the" not in o.text for o in outputs)


def test_text_that_only_looks_like_a_stop_prefix_is_released(model_dir):
    outputs, sequence = run(model_dir, "to the sea and to the river", stop=("to the router",), max_tokens=100)
    assert "".join(o.text for o in outputs) == "to the sea and to the river"
    assert not sequence.finished


def test_max_tokens_finishes_with_length(model_dir):
    outputs, sequence = run(model_dir, "one two three four five six", max_tokens=3)
    assert sequence.finish == Finish.LENGTH
    assert len(sequence.output_ids) == 3
    assert outputs[-1].completion_tokens == 3


def test_multibyte_characters_are_never_split(model_dir):
    outputs, _ = run(model_dir, "東京 🙂 café")
    assert "".join(o.text for o in outputs) == "東京 🙂 café"
    assert all("\ufffd" not in o.text for o in outputs)


def test_a_replayed_sequence_emits_exactly_what_the_first_one_had_not(model_dir):
    """Failover: the text the first sequence held back (a possible stop-string start) comes from the replay."""
    tokenizer = ModelTokenizer.from_dir(model_dir)
    text = "the worker sends tokens to the router now"
    tokens = tokenizer.encode(text, add_special_tokens=False)
    stop = ("to the river",)  # "to the r" is held back until "router" shows it is no stop
    first, _ = run(model_dir, text, stop=stop)
    for k in range(1, len(tokens)):
        already = "".join(o.text for o in first[:k])
        replayed, sequence = run(model_dir, "", stop=stop)
        sequence.replay(tokens[:k])
        outputs = []
        sequence.emit = outputs.append
        for token in tokens[k:]:
            sequence.append_token(token)
        assert not replayed, "replaying emits nothing"
        assert already + "".join(o.text for o in outputs) == "".join(o.text for o in first), k
    assert any("".join(o.text for o in first[:k]) != tokenizer.decode(tokens[:k]) for k in range(1, len(tokens)))
