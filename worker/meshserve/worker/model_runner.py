"""Scheduled chunks in, next-token logits out: the model over the paged KV pool, on one of two paths.

transformers always loads the weights. On the fast path (llama_step.py: the Llama family) the
step is our own straight-line code over those weights, and decode-only steps are compiled
(compiled_decode.py). On the transformers path (every other architecture, and the reference in
tests) transformers runs its own modules and only the attention calls are ours
(paged_attention.py). Either way the cache, its memory budget and the batching of many
sequences into one forward are the engine's.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from meshserve.worker.compiled_decode import COMPILE_MODES, CompiledDecode
from meshserve.worker.cpu_dtype import fastest_cpu_dtype
from meshserve.worker.kernels import load_kernels
from meshserve.worker.llama_step import LlamaStep, unsupported_reason
from meshserve.worker.paged_attention import ATTENTION_NAME, KVPool, PagedBatch, attend
from meshserve.worker.scheduler import ScheduledChunk

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODEL_IMPLS = ("auto", "fast", "transformers")
# On CPU with kv_cache_memory "auto": this share of available memory, at most CPU_AUTO_KV_CAP bytes.
CPU_AUTO_KV_FRACTION = 0.1
CPU_AUTO_KV_CAP = 1 << 30
GPU_AUTO_KV_FRACTION = 0.9


@dataclass(frozen=True)
class KVCacheSpec:
    block_size: int
    num_blocks: int
    bytes_per_block: int

    @property
    def capacity_tokens(self) -> int:
        return self.block_size * self.num_blocks


class ModelRunner:
    def __init__(
        self,
        model_dir: str | Path,
        dtype: str = "float32",
        block_size: int = 16,
        kv_cache_memory: str = "auto",
        num_blocks: int | None = None,
        device: str = "auto",
        kernels: str = "auto",
        model_impl: str = "transformers",
        compile: str = "auto",
        max_batch: int = 16,
    ) -> None:
        if dtype not in DTYPES and dtype != "auto":
            raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, not {dtype!r}")
        if model_impl not in MODEL_IMPLS:
            raise ValueError(f"model_impl must be one of {', '.join(MODEL_IMPLS)}, not {model_impl!r}")
        if compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}, not {compile!r}")
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, not {block_size}")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.kernels = load_kernels(kernels, self.device)
        if self.kernels.__name__.endswith("triton_ops") and (block_size < 16 or block_size & (block_size - 1)):
            raise ValueError(f"the Triton kernels need a block_size that is a power of two >= 16, not {block_size}")
        config = AutoConfig.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=DTYPES.get(dtype, torch.float32), attn_implementation=ATTENTION_NAME
        ).to(self.device)
        self.model.eval()
        self.impl = _choose_impl(model_impl, self.model)
        if dtype == "auto":
            # On CUDA bf16 halves the bytes each step reads. On CPU the fast path takes whichever of bf16 and
            # fp32 this machine computes faster (cpu_dtype.py); eager transformers modules gain little from
            # bf16 there, so that path stays float32.
            if self.device.type == "cuda":
                dtype = "bfloat16"
            elif self.impl == "fast":
                text = config.get_text_config()
                choice = fastest_cpu_dtype(text.hidden_size, text.intermediate_size, max_batch)
                log.info("dtype auto: %s", choice.describe())
                dtype = choice.dtype
            else:
                dtype = "float32"
            self.model.to(DTYPES[dtype])
        self.dtype = dtype
        if self.kernels.__name__.endswith("triton_ops") and self.impl == "transformers":
            _use_kernel_rms_norms(self.model, self.kernels)
        self.model_dir = Path(model_dir)
        self.vocab_size: int = config.vocab_size
        self.max_context_length: int = getattr(config, "max_position_embeddings", None) or getattr(
            config, "n_positions", 2048
        )
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = config.eos_token_id
        self.eos_token_ids: frozenset[int] = frozenset([eos] if isinstance(eos, int) else (eos or []))

        text_config = config.get_text_config()
        num_layers = text_config.num_hidden_layers
        heads = text_config.num_attention_heads
        kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
        bytes_per_block = KVPool.bytes_per_block(num_layers, block_size, kv_heads, head_dim, DTYPES[dtype])
        if num_blocks is None:
            num_blocks = kv_cache_bytes(kv_cache_memory, self.device) // bytes_per_block
        if num_blocks < 1:
            raise ValueError(
                f"kv_cache_memory {kv_cache_memory!r} holds no KV block of {bytes_per_block} bytes; give it more"
            )
        self.kv = KVCacheSpec(block_size, num_blocks, bytes_per_block)
        # One block more than the block manager hands out: padding rows of compiled batches write into it.
        self.scratch_block = num_blocks
        self.pool = KVPool.allocate(
            num_layers, num_blocks + 1, block_size, kv_heads, head_dim, DTYPES[dtype], self.device
        )
        self.step = LlamaStep(self.model, self.kernels) if self.impl == "fast" else None
        self.decode: CompiledDecode | None = None
        if self.step is not None and (compile == "on" or (compile == "auto" and _compiles(self.device))):
            max_blocks = -(-self.max_context_length // block_size)
            self.decode = CompiledDecode(self.step, self.pool, self.scratch_block, max_batch, max_blocks, self.device)
        log.info(
            "KV cache: %d blocks of %d tokens (%.1f MiB, %d tokens)",
            num_blocks,
            block_size,
            num_blocks * bytes_per_block / 2**20,
            self.kv.capacity_tokens,
        )

    def warm_up(self, progress=log.info) -> float:
        """Compiles the decode step now (not at the first request); returns the seconds it took."""
        if self.decode is None:
            return 0.0
        return self.decode.warm_up(progress)

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Computes every chunk's keys and values; returns float32 logits [sampling chunks, vocab]
        for the chunks that reach their sequence's end, in order."""
        decodes = [c for c in chunks if c.length == 1] if self.decode is not None else []
        if not decodes or self.decode.bucket(len(decodes)) is None:
            return self._run_eager(chunks)
        if len(decodes) == len(chunks):
            return self._run_decode(chunks)
        # Decodes always take the compiled step, whatever else the step holds, so a sequence's tokens do not
        # depend on whether a prompt was being prefilled beside it; prompt chunks run eagerly on their own.
        prompts = [c for c in chunks if c.length != 1]
        logits = torch.cat([self._run_decode(decodes), self._run_eager(prompts)])
        rows = {id(c): i for i, c in enumerate(c for c in decodes + prompts if c.samples)}
        return logits[[rows[id(c)] for c in chunks if c.samples]]

    def _run_eager(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        block_size = self.kv.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        decode_rows: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prompt_rows: list[int] = []
        prompt_lens: list[int] = []
        prompt_starts: list[int] = []
        prompt_tables: list[list[int]] = []
        sample_rows: list[int] = []
        for chunk in chunks:
            sequence, first_row = chunk.sequence, len(input_ids)
            table = sequence.block_table
            span = range(chunk.start, chunk.start + chunk.length)
            input_ids += sequence.token_ids[chunk.start : chunk.start + chunk.length]
            positions += span
            slots += [table[p // block_size] * block_size + p % block_size for p in span]
            context = chunk.start + chunk.length
            if chunk.length == 1:
                decode_rows.append(first_row)
                decode_tables.append(table[: -(-context // block_size)])
                decode_lens.append(context)
            else:
                prompt_rows.append(first_row)
                prompt_lens.append(chunk.length)
                prompt_starts.append(chunk.start)
                prompt_tables.append(table[: -(-context // block_size)])
            if chunk.samples:
                sample_rows.append(len(input_ids) - 1)
        paged = PagedBatch(
            pool=self.pool,
            kernels=self.kernels,
            slot_mapping=self._tensor(slots),
            decode_rows=self._tensor(decode_rows),
            decode_block_tables=self._table(decode_tables),
            decode_context_lens=self._tensor(decode_lens),
            prompt_rows=self._tensor(prompt_rows),
            prompt_lens=self._tensor(prompt_lens),
            prompt_starts=self._tensor(prompt_starts),
            prompt_block_tables=self._table(prompt_tables),
            prompt_row_index=self._tensor(
                [r + i for r, n in zip(prompt_rows, prompt_lens, strict=True) for i in range(n)]
            ),
        )
        if self.step is not None:
            return self.step.forward(
                self._tensor(input_ids),
                self._tensor(positions),
                self._tensor(sample_rows),
                lambda layer, q, k, v, scale, window: attend(paged, layer, q, k, v, scale, window),
            )
        out = self.model(
            input_ids=self._tensor(input_ids).unsqueeze(0),
            position_ids=self._tensor(positions).unsqueeze(0),
            use_cache=False,
            logits_to_keep=self._tensor(sample_rows),
            paged=paged,
        )
        return out.logits[0].float()

    def _run_decode(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        block_size = self.kv.block_size
        input_ids, positions, tables = [], [], []
        for chunk in chunks:
            sequence = chunk.sequence
            input_ids.append(sequence.token_ids[chunk.start])
            positions.append(chunk.start)
            tables.append(sequence.block_table[: chunk.start // block_size + 1])
        logits = self.decode.run(input_ids, positions, tables, [p + 1 for p in positions])
        if all(chunk.samples for chunk in chunks):
            return logits
        return logits[[i for i, chunk in enumerate(chunks) if chunk.samples]]

    def _tensor(self, values: list[int] | list[list[int]]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _table(self, tables: list[list[int]]) -> torch.Tensor:
        """Block tables padded with block 0 to the widest: [len(tables), widest]."""
        widest = max((len(t) for t in tables), default=0)
        return self._tensor([t + [0] * (widest - len(t)) for t in tables]).view(len(tables), widest)


def _choose_impl(model_impl: str, model: torch.nn.Module) -> str:
    reason = unsupported_reason(model)
    if model_impl == "fast" and reason is not None:
        raise ValueError(f"model_impl fast cannot run this model: {reason}; use auto or transformers")
    if model_impl == "auto":
        if reason is None:
            return "fast"
        log.info("the model takes the transformers path: %s", reason)
        return "transformers"
    return model_impl


def _compiles(device: torch.device) -> bool:
    """Compiling needs a C++ compiler on CPU (inductor) and nothing more on CUDA (graphs)."""
    if device.type == "cuda":
        return True
    return shutil.which(os.environ.get("CXX", "g++")) is not None


class KernelRMSNorm(torch.nn.Module):
    """A transformers RMSNorm (weight, variance_epsilon) computed by the kernels' fused RMSNorm."""

    def __init__(self, norm: torch.nn.Module, kernels) -> None:
        super().__init__()
        self.weight = norm.weight
        self.eps = norm.variance_epsilon
        self.kernels = kernels

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        out, _ = self.kernels.rms_norm(hidden.reshape(-1, shape[-1]).contiguous(), self.weight, self.eps)
        return out.view(*shape[:-1], -1)


def _use_kernel_rms_norms(model: torch.nn.Module, kernels) -> None:
    """Swaps every Llama-style RMSNorm (a module with weight and variance_epsilon) for the kernel's."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__.endswith("RMSNorm") and hasattr(child, "variance_epsilon"):
                setattr(parent, name, KernelRMSNorm(child, kernels))


def kv_cache_bytes(setting: str, device: torch.device) -> int:
    """'auto', a fraction of the memory available ('0.3'), or a size ('512MiB', '2GB', '1000000')."""
    setting = setting.strip()
    if setting == "auto":
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0] * GPU_AUTO_KV_FRACTION)
        return min(int(_available_host_memory() * CPU_AUTO_KV_FRACTION), CPU_AUTO_KV_CAP)
    try:
        number = float(setting.rstrip("KMGTiBb").strip() or "x")
    except ValueError:
        number = -1.0
    suffix = setting[len(setting.rstrip("KMGTiBb")) :]
    units = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4}
    units |= {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
    if number <= 0 or suffix not in units:
        raise ValueError(
            f"kv_cache_memory must be 'auto', a fraction in (0, 1] or a size like 512MiB or 2GB, not {setting!r}"
        )
    if suffix == "" and number <= 1:
        available = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else _available_host_memory()
        return int(available * number)
    return int(number * units[suffix])


def _available_host_memory() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read MemAvailable from /proc/meminfo; set kv_cache_memory to a size")
