"""Driving the engine in tests: start one on a given model path, submit requests, collect what comes out."""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field

from meshserve.common.tokenizer import ModelTokenizer
from meshserve.worker.engine import Engine
from meshserve.worker.model_runner import ModelRunner
from meshserve.worker.sequence import Finish, SamplingOptions, Sequence, SequenceOutput
from support import wait_for

WAIT_S = 120


@dataclass
class Result:
    tokens: list[int] = field(default_factory=list)
    outputs: list[SequenceOutput] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def finish(self) -> Finish | None:
        return self.outputs[-1].finish if self.outputs else None


# The engine's model paths, each compared with itself: (model_impl, compile, dtype).
PATHS = {
    "transformers": ("transformers", "off", "float32"),
    "fast": ("fast", "off", "float32"),
    "compiled": ("fast", "on", "float32"),
    "compiled-bf16": ("fast", "on", "bfloat16"),
}


def start_engine(
    model_dir, num_blocks: int = 512, max_num_seqs: int = 32, tokenizer=None, path: str = "transformers", **kwargs
) -> Engine:
    model_impl, compile, dtype = PATHS[path]
    runner = ModelRunner(
        model_dir,
        dtype,
        num_blocks=num_blocks,
        block_size=kwargs.pop("block_size", 16),
        model_impl=model_impl,
        compile=compile,
        max_batch=max_num_seqs,
    )
    runner.warm_up()
    engine = Engine(runner, tokenizer or ModelTokenizer.from_dir(model_dir), max_num_seqs, **kwargs)
    engine.start()
    return engine


def make_sequence(
    engine: Engine, tokenizer: ModelTokenizer, prompt: list[int], options: SamplingOptions, **kwargs
) -> tuple[Sequence, Result]:
    result = Result()

    def emit(output: SequenceOutput) -> None:
        result.tokens += output.token_ids
        result.outputs.append(output)
        if output.finish is not None:
            result.done.set()

    sequence = engine.new_sequence(f"r{random.random()}", prompt, options, kwargs.pop("emit", emit), **kwargs)
    return sequence, result


def run_all(engine: Engine, tokenizer, requests, **kwargs) -> list[Result]:
    """Submits every (prompt, options) at once and waits for all of them."""
    pairs = [make_sequence(engine, tokenizer, p, o, **kwargs) for p, o in requests]
    for sequence, _ in pairs:
        engine.submit(sequence)
    for _, result in pairs:
        assert result.done.wait(WAIT_S), "a sequence never finished"
    return [r for _, r in pairs]


def run_alone(engine: Engine, tokenizer, requests) -> list[list[int]]:
    return [run_all(engine, tokenizer, [r])[0].tokens for r in requests]


def assert_no_leaks(engine: Engine) -> None:
    wait_for(lambda: not (engine.scheduler.has_work() or engine._incoming), "the engine to run out of work", 10)
    manager = engine.block_manager
    assert not engine.scheduler.has_work()
    assert manager.num_free_blocks == manager.num_blocks
    assert all(block.ref_count == 0 for block in manager.blocks)


def mixed_requests(count: int, seed: int, vocab: int, longest: int = 300) -> list[tuple[list[int], SamplingOptions]]:
    """Prompts of mixed lengths (some longer than a step's token budget), greedy and seeded sampling mixed."""
    rng = random.Random(seed)
    requests = []
    for i in range(count):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.choice([1, 5, 17, 40, 90, 150, longest]))]
        if i % 2 == 0:
            options = SamplingOptions(max_tokens=rng.randint(4, 24), temperature=0.0, ignore_eos=True)
        else:
            options = SamplingOptions(
                max_tokens=rng.randint(4, 24),
                temperature=rng.choice([0.7, 1.0, 1.3]),
                top_k=rng.choice([0, 50]),
                top_p=rng.choice([1.0, 0.9]),
                min_p=rng.choice([0.0, 0.05]),
                repetition_penalty=rng.choice([1.0, 1.2]),
                presence_penalty=rng.choice([0.0, 0.5]),
                frequency_penalty=rng.choice([0.0, 0.3]),
                seed=rng.randrange(1 << 30),
                ignore_eos=True,
            )
        requests.append((prompt, options))
    return requests
