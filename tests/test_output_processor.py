"""The engine's step loop only computes; text, stop strings and delivery happen on the output processor's thread,
once per step, and give exactly what a sequence run token by token gives."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import pytest

from engine_support import WAIT_S, assert_no_leaks, make_sequence, run_all, start_engine
from meshserve.common.tokenizer import IncrementalDetokenizer, ModelTokenizer
from meshserve.worker.engine import Engine
from meshserve.worker.model_runner import ModelRunner
from meshserve.worker.sequence import Finish, SamplingOptions, SequenceOutput
from support import wait_for

PROMPT = "The router picks a worker for each request"
OUTPUT_THREAD = "engine-outputs"


class WatchedDetokenizer:
    """A detokeniser that records the thread of every call and can hold the output side at one token until
    `until()` is true (the engine meanwhile computes on)."""

    def __init__(
        self, inner: IncrementalDetokenizer, hold_at: int = -1, until: Callable[[], bool] = lambda: True
    ) -> None:
        self.inner, self.hold_at, self.until = inner, hold_at, until
        self.threads: list[str] = []

    def add(self, token_id: int) -> str:
        if len(self.threads) == self.hold_at:
            wait_for(self.until, "the engine to compute past the stopping token", WAIT_S)
        self.threads.append(threading.current_thread().name)
        return self.inner.add(token_id)


def alone(engine: Engine, prompt: list[int], options: SamplingOptions, tokens: list[int]) -> list[SequenceOutput]:
    """The outputs of these tokens given one by one, nothing in between: the semantics to match."""
    outputs: list[SequenceOutput] = []
    sequence = engine.new_sequence("alone", prompt, options, outputs.append)
    for token in tokens:
        if sequence.finished:
            break
        sequence.append_token(token)
    return outputs


def summary(outputs: list[SequenceOutput]) -> list[tuple]:
    return [(o.token_ids, o.text, o.finish, o.completion_tokens, o.error) for o in outputs]


@pytest.mark.parametrize("include_stop_str_in_output", [False, True])
def test_a_stop_string_found_after_the_engine_ran_on_ends_where_it_would_alone(
    model_dir, tokenizer: ModelTokenizer, include_stop_str_in_output: bool
):
    engine = start_engine(model_dir)
    prompt = tokenizer.encode(PROMPT)
    free = SamplingOptions(max_tokens=24, temperature=0.0, ignore_eos=True)
    try:
        [unstopped] = run_all(engine, tokenizer, [(prompt, free)])
        pieces = [o.text for o in unstopped.outputs]
        # A stop string across the boundary of tokens k-1 and k, whose first match completes at token k.
        for k in range(6, 18):
            if len(pieces[k - 1]) < 2 or not pieces[k]:
                continue
            options = SamplingOptions(
                max_tokens=400,  # far more than the engine computes before it is asked to drop the sequence
                temperature=0.0,
                ignore_eos=True,
                stop=(pieces[k - 1][-2:] + pieces[k][:1],),
                include_stop_str_in_output=include_stop_str_in_output,
            )
            expected = alone(engine, prompt, options, unstopped.tokens)
            if expected[-1].completion_tokens == k + 1:
                break
        else:
            pytest.fail(f"no stop string in the middle of {pieces!r}")
        sequence, result = make_sequence(engine, tokenizer, prompt, options)
        # The output side reaches the stopping token only when the engine has computed two more.
        sequence.detokenizer = WatchedDetokenizer(sequence.detokenizer, k, lambda: len(sequence.output_ids) >= k + 3)
        engine.submit(sequence)
        assert result.done.wait(WAIT_S)
        assert_no_leaks(engine)
    finally:
        engine.stop()
    assert expected[-1].finish == Finish.STOP
    assert len(sequence.output_ids) >= k + 3, "the stop string was not found late"
    assert summary(result.outputs) == summary(expected)
    assert result.tokens == unstopped.tokens[: k + 1]
    assert sequence.finish == Finish.STOP and len(sequence.output_ids) < 400, "the engine did not drop it"
    load = engine.load()
    assert load.sequences_finished == 2 and load.sequences_cancelled == 0


def test_a_steps_outputs_for_the_streams_of_one_loop_arrive_in_one_wake_up(model_dir, tokenizer):
    streams, steps = 8, 6
    loop = asyncio.new_event_loop()
    loop_thread = threading.Thread(target=loop.run_forever, name="streams-loop", daemon=True)
    loop_thread.start()
    wake_ups: list[int] = []  # the outputs each call_soon_threadsafe carried
    call_soon_threadsafe = loop.call_soon_threadsafe

    def counting(callback, *args, **kwargs):
        wake_ups.append(len(args[0]))
        return call_soon_threadsafe(callback, *args, **kwargs)

    loop.call_soon_threadsafe = counting
    received: list[list[tuple[str, SequenceOutput]]] = [[] for _ in range(streams)]
    all_done = threading.Event()

    def emitter(i: int) -> Callable[[SequenceOutput], None]:
        def emit(output: SequenceOutput) -> None:
            received[i].append((threading.current_thread().name, output))
            if all(r and r[-1][1].finish is not None for r in received):
                all_done.set()

        return emit

    engine = Engine(ModelRunner(model_dir, num_blocks=128), tokenizer, max_num_seqs=streams)
    options = SamplingOptions(max_tokens=steps, temperature=0.0, ignore_eos=True)
    try:
        # All submitted before the loop starts: they are prefilled in one step, then decode together.
        for i in range(streams):
            engine.submit(engine.new_sequence(f"s{i}", [5, 6, 7 + i], options, emitter(i), loop=loop))
        engine.start()
        assert all_done.wait(WAIT_S)
        assert_no_leaks(engine)
    finally:
        engine.stop()
        loop.call_soon_threadsafe = call_soon_threadsafe
        loop.call_soon_threadsafe(loop.stop)
        loop_thread.join(10)
        loop.close()
    assert sum(wake_ups) == streams * steps, wake_ups
    # One per step at the most (several steps go out together when the processor is behind), never per token.
    assert 1 <= len(wake_ups) <= steps, f"{len(wake_ups)} wake-ups for {steps} steps of {streams} streams"
    assert all(n % streams == 0 for n in wake_ups), f"a step's outputs were split across wake-ups: {wake_ups}"
    for outputs in received:
        assert {thread for thread, _ in outputs} == {"streams-loop"}
        assert [o.completion_tokens for _, o in outputs] == list(range(1, steps + 1))
        assert outputs[-1][1].finish == Finish.LENGTH


def test_the_engine_thread_never_detokenises(model_dir, tokenizer):
    engine = start_engine(model_dir)
    prompt = tokenizer.encode(PROMPT)
    options = [
        SamplingOptions(max_tokens=12, temperature=0.0, stop=("zz", "qq")),
        SamplingOptions(max_tokens=8, temperature=0.8, seed=3, ignore_eos=True, min_tokens=4),
    ]
    emitted_on: list[str] = []
    try:
        pairs = [make_sequence(engine, tokenizer, prompt, o) for o in options * 3]
        for sequence, _ in pairs:
            sequence.detokenizer = WatchedDetokenizer(sequence.detokenizer)
            emit = sequence.emit
            sequence.emit = lambda output, emit=emit: (emitted_on.append(threading.current_thread().name), emit(output))
            engine.submit(sequence)
        for _, result in pairs:
            assert result.done.wait(WAIT_S)
        assert_no_leaks(engine)
    finally:
        engine.stop()
    calls = [thread for sequence, _ in pairs for thread in sequence.detokenizer.threads]
    assert len(calls) == sum(len(sequence.output_ids) for sequence, _ in pairs)
    assert set(calls) == {OUTPUT_THREAD}, f"the detokeniser ran on {set(calls)}"
    assert set(emitted_on) == {OUTPUT_THREAD}
