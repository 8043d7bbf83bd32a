"""What constrained decoding costs a step: one decode step at batch 16 with 0, 1 and all 16 sequences
constrained to a JSON Schema, on the fast path and on the transformers path, in one run.

    python bench/structured.py [--batch 16] [--steps 40] [--rounds 3] [--threads 1]

Each case drives the engine's scheduler by hand to a batch of decodes and times the step's parts: the
model forward, sampling (with the grammar masks: llguidance computes each constrained row's mask and the
sampler applies it) and the token bookkeeping (each matcher takes its token). The cases are alternated
round by round, so the machine's drift hits them alike; the table gives the mean per step and the
overhead against the unconstrained batch.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from engine import prompts, start

from meshserve.common.structured import grammar_of
from meshserve.common.tokenizer import ModelTokenizer
from meshserve.v1 import common_pb2
from meshserve.worker.builtin_model import ensure_builtin_model
from meshserve.worker.engine import Engine
from meshserve.worker.sampler import sample
from meshserve.worker.sequence import SamplingOptions

# Long enough never to end within the measured steps: a list of short records, as an extraction would.
SCHEMA = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {"id": {"type": "integer"}, "tag": {"enum": ["a", "b", "c"]}, "note": {"type": "string"}},
        "required": ["id", "tag", "note"],
        "additionalProperties": False,
    },
}


def time_steps(engine: Engine, batch: list[list[int]], constrained: int, steps: int) -> dict[str, float]:
    """Seconds per step of each part, at `len(batch)` decodes of which `constrained` follow SCHEMA."""
    grammar = grammar_of(common_pb2.StructuredOutput(json_schema=json.dumps(SCHEMA)))
    free = SamplingOptions(max_tokens=100_000, temperature=0.0, ignore_eos=True)
    bound = SamplingOptions(max_tokens=100_000, temperature=0.0, ignore_eos=True, grammar=grammar)
    sequences = []
    for i, prompt in enumerate(batch):
        sequence = engine.new_sequence(f"s{i}", prompt, bound if i < constrained else free, lambda output: None)
        engine.constrain(sequence)
        engine.scheduler.add(sequence)
        sequences.append(sequence)
    while any(s.num_computed_tokens < len(s.prompt_ids) for s in sequences):
        engine.step()
    for _ in range(3):
        engine.step()
    parts = {"model forward": 0.0, "sample (with masks)": 0.0, "token ids (matchers take them)": 0.0}
    for _ in range(steps):
        t0 = time.perf_counter()
        chunks = engine.scheduler.schedule()
        logits = engine.runner.run(chunks)
        t1 = time.perf_counter()
        engine.scheduler.update(chunks)
        running = [c.sequence for c in chunks]
        tokens, logprobs = sample(logits, running)
        t2 = time.perf_counter()
        engine.advance(running, tokens, logprobs)
        t3 = time.perf_counter()
        engine.hand_out()
        for key, seconds in zip(parts, (t1 - t0, t2 - t1, t3 - t2), strict=True):
            parts[key] += seconds / steps
    for sequence in sequences:
        if not sequence.finished:
            engine.scheduler.remove(sequence)
    assert all(s.matcher is None or not s.matcher.is_error() for s in sequences), "a matcher failed"
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = ensure_builtin_model()
    tokenizer = ModelTokenizer.from_dir(model_dir)
    engines = {
        "fast": start(model_dir, tokenizer, "fast", "auto", "cpu", args.batch),
        "transformers": start(model_dir, tokenizer, "transformers", "float32", "cpu", args.batch),
    }
    for engine in engines.values():
        engine.outputs.stop()  # hand_out() then processes each step at once, here
    cases = [0, 1, args.batch]
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    for round_ in range(args.rounds):
        for path, engine in engines.items():
            for constrained in cases:
                batch = prompts(args.batch, engine.runner.vocab_size, seed=round_)
                results.setdefault((path, constrained), []).append(time_steps(engine, batch, constrained, args.steps))
    print(f"\none decode step at batch {args.batch}, mean of {args.rounds} rounds x {args.steps} steps (ms)")
    # The masks cost what sampling and the token bookkeeping gain over the unconstrained batch; the forward
    # is the same work in every case (its spread is the machine's noise), so the cost is set against the
    # unconstrained step.
    print(f"{'path':<13} {'constrained':>11} {'step':>8} {'forward':>8} {'sample':>8} {'tokens':>8} {'masks cost':>11}")
    for path in engines:
        base_step = base_rest = 0.0
        for constrained in cases:
            runs = results[(path, constrained)]
            mean = {key: sum(r[key] for r in runs) / len(runs) * 1000 for key in runs[0]}
            forward, sampled, tokens = mean.values()
            if constrained == 0:
                base_step, base_rest = forward + sampled + tokens, sampled + tokens
            cost = sampled + tokens - base_rest
            print(
                f"{path:<13} {constrained:>11} {forward + sampled + tokens:8.2f} {forward:8.2f} {sampled:8.2f} "
                f"{tokens:8.2f} {cost:+6.2f} ({cost / base_step:+.1%})"
            )
    for engine in engines.values():
        engine.stop()


if __name__ == "__main__":
    main()
