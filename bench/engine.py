"""The engine's fast path against its transformers path and a naive server, in one run.

    python bench/engine.py [--concurrency 1,4,16,32,64] [--max-tokens 64] [--threads 1] [--device cuda]

Three contenders: the engine on the fast path (our Llama step, decode compiled, in the dtype
the worker's `--dtype auto` measures to be faster here), the same engine on the transformers path
(fp32 by default), and a naive server (one `transformers` generate() per request, each on its
own thread, as a thread-per-request server would). For each concurrency each serves that many
requests at once (different prompts of 20-60 tokens, greedy, ignore_eos so every request yields
max_tokens), one after the other; the script prints output tokens/s, mean and worst time to
first token, and the ratios. All use the same number of torch threads. Finally it profiles one
decode step of the fast path at batch 16: where the time goes, on the engine thread and,
meanwhile, on the output processor's.
"""

from __future__ import annotations

import argparse
import random
import statistics
import threading
import time
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer

from meshserve.common.tokenizer import ModelTokenizer
from meshserve.worker.builtin_model import ensure_builtin_model
from meshserve.worker.engine import Engine
from meshserve.worker.model_runner import DTYPES, ModelRunner
from meshserve.worker.sampler import sample
from meshserve.worker.sequence import SamplingOptions, SequenceOutput

OUTPUT_PART = "tokens out (detokenise, stop checks) [own thread]"


@dataclass
class Run:
    tokens_per_second: float
    ttft_mean: float
    ttft_max: float


def prompts(count: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(20, 60))] for _ in range(count)]


def run_engine(engine: Engine, batch: list[list[int]], max_tokens: int) -> Run:
    options = SamplingOptions(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    done = threading.Semaphore(0)
    first_token: dict[int, float] = {}
    counts = [0] * len(batch)

    def emitter(i: int):
        def emit(output: SequenceOutput) -> None:
            first_token.setdefault(i, time.perf_counter())
            counts[i] += len(output.token_ids)
            if output.finish is not None:
                done.release()

        return emit

    start = time.perf_counter()
    for i, prompt in enumerate(batch):
        engine.submit(engine.new_sequence(str(i), prompt, options, emitter(i)))
    for _ in batch:
        if not done.acquire(timeout=600):
            raise SystemExit("the engine did not finish within 10 minutes")
    elapsed = time.perf_counter() - start
    ttfts = [first_token[i] - start for i in range(len(batch))]
    return Run(sum(counts) / elapsed, statistics.mean(ttfts), max(ttfts))


class FirstTokenTimer(BaseStreamer):
    """generate() calls put() with the prompt first, then with each new token."""

    def __init__(self) -> None:
        self.calls = 0
        self.first_token_at: float | None = None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2 and self.first_token_at is None:
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        pass


def run_naive(model, batch: list[list[int]], max_tokens: int) -> Run:
    timers = [FirstTokenTimer() for _ in batch]
    counts = [0] * len(batch)

    def serve(i: int) -> None:
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([batch[i]], device=model.device),
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
                streamer=timers[i],
                pad_token_id=0,
            )
        counts[i] = out.shape[1] - len(batch[i])

    start = time.perf_counter()
    threads = [threading.Thread(target=serve, args=(i,)) for i in range(len(batch))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    ttfts = [t.first_token_at - start for t in timers]
    return Run(sum(counts) / elapsed, statistics.mean(ttfts), max(ttfts))


def profile_decode_step(engine: Engine, batch: list[list[int]]) -> None:
    """Drives the scheduler by hand to a batch of decodes, then times each part of one step."""
    options = SamplingOptions(max_tokens=1000, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(batch):
        engine.scheduler.add(engine.new_sequence(f"p{i}", prompt, options, lambda output: None))
    while any(s.num_computed_tokens < len(s.prompt_ids) for s in engine.scheduler.running + engine.scheduler.waiting):
        engine.step()
    for _ in range(5):
        engine.step()
    parts = {
        "schedule": 0.0,
        "model forward": 0.0,
        "sample": 0.0,
        "token ids, stop tokens, max_tokens": 0.0,
        OUTPUT_PART: 0.0,
    }
    steps = 50
    for _ in range(steps):
        t0 = time.perf_counter()
        chunks = engine.scheduler.schedule()
        t1 = time.perf_counter()
        logits = engine.runner.run(chunks)
        t2 = time.perf_counter()
        engine.scheduler.update(chunks)
        sequences = [c.sequence for c in chunks]
        tokens, logprobs = sample(logits, sequences)
        t3 = time.perf_counter()
        engine.advance(sequences, tokens, logprobs)
        t4 = time.perf_counter()
        engine.hand_out()  # the output processor is stopped: it processes the step here, at once
        t5 = time.perf_counter()
        for key, seconds in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
            parts[key] += seconds
    total = sum(parts.values())
    on_engine = total - parts[OUTPUT_PART]
    print(
        f"\none decode step at batch {len(batch)}: {on_engine / steps * 1000:.2f} ms on the engine thread, "
        f"{parts[OUTPUT_PART] / steps * 1000:.2f} ms on the output processor's meanwhile"
    )
    for key, seconds in parts.items():
        print(f"  {key:48s} {seconds / steps * 1000:6.2f} ms  {seconds / total:5.1%}")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            engine.runner.run(engine.scheduler.schedule())
    print("\ninside the model forward (torch ops, self time, 10 steps):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    for sequence in list(engine.scheduler.running):
        engine.scheduler.remove(sequence)


def start(model_dir, tokenizer, impl: str, dtype: str, device: str, max_num_seqs: int) -> Engine:
    compile = "on" if impl == "fast" else "off"
    began = time.perf_counter()
    runner = ModelRunner(
        model_dir,
        dtype,
        kv_cache_memory="256MiB",
        device=device,
        model_impl=impl,
        compile=compile,
        max_batch=max_num_seqs,
    )
    compiled = runner.warm_up(lambda line: None)
    print(f"{impl} path: {runner.dtype}, ready in {time.perf_counter() - began:.1f} s ({compiled:.1f} s compiling)")
    engine = Engine(runner, tokenizer, max_num_seqs=max_num_seqs, max_num_batched_tokens=512)
    engine.start()
    return engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,4,16,32,64")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, for all three")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the naive server runs there too)")
    parser.add_argument("--dtype", default="auto", help="the fast path's dtype (auto: as the worker chooses it)")
    parser.add_argument("--reference-dtype", default="float32", help="the transformers path's and naive dtype")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive server (slow at high concurrency)")
    parser.add_argument("--no-profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    levels = [int(c) for c in args.concurrency.split(",")]

    model_dir = ensure_builtin_model()
    tokenizer = ModelTokenizer.from_dir(model_dir)
    engines = {
        "fast": start(model_dir, tokenizer, "fast", args.dtype, args.device, max(levels)),
        "transformers": start(model_dir, tokenizer, "transformers", args.reference_dtype, args.device, max(levels)),
    }
    naive = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[args.reference_dtype]).to(args.device).eval()
    vocab = engines["fast"].runner.vocab_size
    for engine in engines.values():
        run_engine(engine, prompts(4, vocab, seed=99), 8)  # warm-up
    run_naive(naive, prompts(1, vocab, seed=99), 8)
    print(
        f"\nbuilt-in model, {args.max_tokens} output tokens per request, {args.threads} torch thread(s), "
        f"{args.device}; tok/s and TTFT mean/max in s\n"
    )
    print(
        f"{'concurrent':>10} | {'fast':>7} {'TTFT':>13} | {'transformers':>12} {'TTFT':>13} | {'naive':>6} "
        f"{'TTFT':>13} | {'fast/transformers':>17} {'fast/naive':>10}"
    )
    for level in levels:
        # Prompts differ per level so the prefix cache cannot help; the contenders alternate at each level.
        batch = prompts(level, vocab, seed=level)
        fast = run_engine(engines["fast"], batch, args.max_tokens)
        reference = run_engine(engines["transformers"], batch, args.max_tokens)
        baseline = None if args.no_naive else run_naive(naive, batch, args.max_tokens)
        cells = [f"{level:>10}"]
        for run, width in ((fast, 7), (reference, 12), (baseline, 6)):
            cells.append(
                f"{run.tokens_per_second:>{width}.0f} {run.ttft_mean:>6.3f}/{run.ttft_max:<6.3f}"
                if run
                else f"{'-':>{width}} {'':13}"
            )
        ratio_naive = f"{fast.tokens_per_second / baseline.tokens_per_second:>9.1f}x" if baseline else f"{'-':>10}"
        cells.append(f"{fast.tokens_per_second / reference.tokens_per_second:>16.2f}x {ratio_naive}")
        print(" | ".join(cells), flush=True)
    for engine in engines.values():
        engine.stop()
    if not args.no_profile:
        print("\nthe fast path:")
        profile_decode_step(engines["fast"], prompts(16, vocab, seed=123))


if __name__ == "__main__":
    main()
