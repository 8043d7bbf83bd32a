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


def feed(model_dir, token_ids: list[int], **options) -> tuple[list, Sequence]:
    """A sequence given these output token ids one by one (until it finishes)."""
    tokenizer = ModelTokenizer.from_dir(model_dir)
    prompt = tokenizer.encode("Say:")
    outputs: list = []
    sampling = SamplingOptions(**{"max_tokens": 100, **options})
    sequence = Sequence(
        request_id="r",
        prompt_ids=prompt,
        options=sampling,
        detokenizer=tokenizer.detokenizer(prompt, sampling.skip_special_tokens, sampling.spaces_between_special_tokens),
        eos_token_ids=frozenset({EOS}),
        max_context_length=2048,
        emit=outputs.append,
    )
    for token in token_ids:
        if sequence.finished:
            break
        sequence.append_token(token)
    return outputs, sequence


EOS, END_OF_TURN = 1, 6  # the built-in tokenizer's </s> and <|end|>


def chars(model_dir, text: str) -> list[int]:
    """One token per character (the byte-level alphabet has them all), to place each one exactly."""
    tokenizer = ModelTokenizer.from_dir(model_dir)
    ids = [tokenizer.encode(c, add_special_tokens=False) for c in text]
    assert all(len(i) == 1 for i in ids)
    return [i[0] for i in ids]


def text_of(outputs) -> str:
    return "".join(o.text for o in outputs)


def test_stop_token_ids_and_eos_do_not_stop_before_min_tokens(model_dir):
    tokens = chars(model_dir, "abcdef")
    stop = tokens[1]
    _, sequence = feed(model_dir, tokens, stop_token_ids=(stop,))
    assert len(sequence.output_ids) == 2 and sequence.finish == Finish.STOP
    _, sequence = feed(model_dir, [*tokens[:2], *tokens], stop_token_ids=(stop,), min_tokens=4)
    assert len(sequence.output_ids) == 4, "the stop token at position 2 ended the sequence before min_tokens"
    assert sequence.finish == Finish.STOP  # the second one, past min_tokens
    _, sequence = feed(model_dir, [tokens[0], EOS, tokens[1], EOS], min_tokens=3)
    assert len(sequence.output_ids) == 4 and sequence.finish == Finish.STOP


def test_the_stop_tokens_text_is_left_out_unless_include_stop_str_in_output(model_dir):
    tokens = chars(model_dir, "abc")
    outputs, sequence = feed(model_dir, tokens, stop_token_ids=(tokens[2],))
    assert text_of(outputs) == "ab" and sequence.finish == Finish.STOP
    outputs, _ = feed(model_dir, tokens, stop_token_ids=(tokens[2],), include_stop_str_in_output=True)
    assert text_of(outputs) == "abc"


def test_stop_strings_are_not_looked_for_before_min_tokens(model_dir):
    outputs, sequence = feed(model_dir, chars(model_dir, "xaz"), stop=("a", "abc"), min_tokens=3)
    assert text_of(outputs) == "xaz" and not sequence.finished, "a stop generated before min_tokens counted"
    outputs, sequence = feed(model_dir, chars(model_dir, "xazaq"), stop=("a",), min_tokens=3)
    assert text_of(outputs) == "xaz" and sequence.finish == Finish.STOP
    assert len(sequence.output_ids) == 4


def test_a_stop_string_completed_at_min_tokens_counts(model_dir):
    """Its start was held back before min_tokens (unchecked); the token that completes it is checked."""
    outputs, sequence = feed(model_dir, chars(model_dir, "xabcz"), stop=("abc",), min_tokens=4)
    assert text_of(outputs) == "x" and sequence.finish == Finish.STOP and len(sequence.output_ids) == 4


def test_include_stop_str_in_output_keeps_the_stop_string(model_dir):
    text = "the worker sends tokens to the router now"
    outputs, sequence = run(model_dir, text, stop=("to the router",), include_stop_str_in_output=True)
    assert text_of(outputs) == "the worker sends tokens to the router"
    assert sequence.finish == Finish.STOP
    outputs, _ = feed(model_dir, chars(model_dir, "xabcz"), stop=("z", "bc"), include_stop_str_in_output=True)
    assert text_of(outputs) == "xabc", "the earliest stop string ends the text, with it"


def hf_join(pieces: list[tuple[str, bool]]) -> str:
    """Hugging Face's slow-tokenizer decode with spaces_between_special_tokens: text runs and added tokens
    are separate pieces, joined by one space."""
    joined: list[str] = []
    run_text = ""
    for text, special in pieces:
        if special:
            joined += [run_text] if run_text else []
            joined.append(text)
            run_text = ""
        else:
            run_text += text
    return " ".join(joined + ([run_text] if run_text else []))


def test_skip_special_tokens_false_shows_them_with_spaces_between_as_hf_decodes(model_dir):
    tokenizer = ModelTokenizer.from_dir(model_dir)
    hello, bye = tokenizer.encode("hello", add_special_tokens=False), tokenizer.encode(" bye", add_special_tokens=False)
    tokens = [*hello, EOS, END_OF_TURN, *bye, END_OF_TURN]
    outputs, _ = feed(model_dir, tokens, ignore_eos=True)
    assert text_of(outputs) == "hello bye"
    outputs, _ = feed(
        model_dir, tokens, ignore_eos=True, skip_special_tokens=False, spaces_between_special_tokens=False
    )
    assert text_of(outputs) == "hello</s><|end|> bye<|end|>" == tokenizer.decode(tokens, skip_special_tokens=False)
    outputs, _ = feed(model_dir, tokens, ignore_eos=True, skip_special_tokens=False)
    expected = hf_join([("hello", False), ("</s>", True), ("<|end|>", True), (" bye", False), ("<|end|>", True)])
    assert text_of(outputs) == expected == "hello </s> <|end|>  bye <|end|>"


def test_a_replay_with_min_tokens_and_kept_stop_strings_emits_exactly_the_rest(model_dir):
    tokenizer = ModelTokenizer.from_dir(model_dir)
    tokens = [*tokenizer.encode("the worker sends tokens to the river", add_special_tokens=False), EOS, 7]
    options = {
        "stop": ("to the river", "worker"),
        "min_tokens": 3,
        "include_stop_str_in_output": True,
        "skip_special_tokens": False,
    }
    first, _ = feed(model_dir, tokens, **options)
    assert text_of(first).endswith("to the river") and "worker" in text_of(first)
    for k in range(1, len(first)):
        replayed, sequence = feed(model_dir, [], **options)
        sequence.replay(tokens[:k])
        rest: list = []
        sequence.emit = rest.append
        for token in tokens[k : len(first)]:
            sequence.append_token(token)
        assert not replayed
        assert text_of(first[:k]) + text_of(rest) == text_of(first), k
        assert sequence.finish == Finish.STOP
