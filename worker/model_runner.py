"""Tensors in, logits out: the Hugging Face model over left-padded batches with a DynamicCache."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class BatchState:
    cache: DynamicCache
    attention_mask: torch.Tensor  # [batch, tokens so far], 0 on left padding
    next_positions: torch.Tensor  # [batch], position id of each sequence's next token


class ModelRunner:
    def __init__(self, model_dir: str | Path, dtype: str = "float32") -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
        config = AutoConfig.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype]).eval()
        self.vocab_size: int = config.vocab_size
        self.max_context_length: int = getattr(config, "max_position_embeddings", 2048)
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = config.eos_token_id
        self.eos_token_ids: frozenset[int] = frozenset([eos] if isinstance(eos, int) else (eos or []))

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]]) -> tuple[torch.Tensor, BatchState]:
        """Runs the prompts (left-padded to one length). Returns last-position logits [batch, vocab]."""
        longest = max(len(p) for p in prompts)
        input_ids = torch.zeros(len(prompts), longest, dtype=torch.long)
        attention_mask = torch.zeros(len(prompts), longest, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, longest - len(prompt) :] = torch.tensor(prompt)
            attention_mask[row, longest - len(prompt) :] = 1
        position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
        cache = DynamicCache()
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        state = BatchState(cache, attention_mask, position_ids[:, -1] + 1)
        return out.logits[:, -1, :].float(), state

    @torch.inference_mode()
    def decode(self, state: BatchState, next_tokens: list[int], keep_rows: list[int] | None = None) -> torch.Tensor:
        """One step for every kept row; rows not in keep_rows leave the batch (and the cache) for good."""
        if keep_rows is not None and len(keep_rows) != state.attention_mask.shape[0]:
            index = torch.tensor(keep_rows, dtype=torch.long)
            state.cache.batch_select_indices(index)
            state.attention_mask = state.attention_mask[index]
            state.next_positions = state.next_positions[index]
        state.attention_mask = torch.cat(
            [state.attention_mask, torch.ones(len(next_tokens), 1, dtype=torch.long)], dim=1
        )
        out = self.model(
            input_ids=torch.tensor(next_tokens, dtype=torch.long).unsqueeze(1),
            attention_mask=state.attention_mask,
            position_ids=state.next_positions.unsqueeze(1),
            past_key_values=state.cache,
            use_cache=True,
        )
        state.next_positions = state.next_positions + 1
        return out.logits[:, -1, :].float()
