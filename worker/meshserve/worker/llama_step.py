"""The fast path: one engine step of a Llama-family model as straight-line tensor code over the paged pool.

transformers loads the model and stays the only loader; this module takes its weights as they are
(q|k|v and gate|up concatenated once, so each is one matmul), its rotary tables (computed by the
model's own rotary module, so every static RoPE scaling transformers knows is right), and per
layer its sliding window. A step is embeddings → per layer RMSNorm, attention over the pool,
RMSNorm, SwiGLU MLP → final norm → lm_head on the rows that sample only.

Attention is a parameter: the eager path passes the engine's paged attention (decode and
prefill kernels, Triton on CUDA), the compiled CPU decode passes `reduce_decode_attention`,
written as multiply + sum reductions so inductor fuses the block gather into one kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F

# Architectures whose decoder layer is Llama's (pre-norm RMSNorm, rotary, GQA, SwiGLU); Mistral adds a
# sliding window, Qwen2 q/k/v biases and per-layer windows. Anything else takes the transformers path.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
# RoPE variants whose tables depend on the position only (not on the sequence's length).
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")

# (layer, queries [T, heads, dim], keys [T, kv_heads, dim], values, scale, window) -> [T, heads, dim];
# it also writes the step's keys and values into the pool.
Attention = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, float, int], torch.Tensor]


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why the fast path cannot run this model, or None when it can."""
    config = model.config
    architecture = type(model).__name__
    if architecture not in SUPPORTED_ARCHITECTURES:
        return f"{architecture} is not one of {', '.join(SUPPORTED_ARCHITECTURES)}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r} is not silu"
    if getattr(config, "mlp_bias", False):
        return "MLP biases are not supported"
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope not in STATIC_ROPE_TYPES:
        return f"rope_type {rope!r} depends on the sequence length"
    return None


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: torch.Tensor  # [(heads + 2 kv_heads) * head_dim, hidden]
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up: torch.Tensor  # [2 * intermediate, hidden]
    down: torch.Tensor
    window: int  # 0: none


class LlamaStep:
    """The weights of a loaded Llama-family model, laid out for the step, and the step itself."""

    def __init__(self, model: torch.nn.Module, kernels: ModuleType) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"the fast path cannot run this model: {reason}")
        config = model.config.get_text_config()
        self.kernels = kernels
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        self.scale = self.head_dim**-0.5
        body = model.model
        self.embed = body.embed_tokens.weight
        self.norm = body.norm.weight
        self.lm_head = model.lm_head.weight
        self.layers = [self._layer(layer, config) for layer in body.layers]
        self.cos, self.sin = _rotary_tables(body.rotary_emb, config, self.embed)

    def _layer(self, layer: torch.nn.Module, config) -> LayerWeights:
        attn, mlp = layer.self_attn, layer.mlp
        biases = [p.bias for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
        # Mistral's modules read the window from the config; Qwen2's set it per layer (None on full layers).
        window = attn.sliding_window if hasattr(attn, "sliding_window") else getattr(config, "sliding_window", None)
        return LayerWeights(
            input_norm=layer.input_layernorm.weight,
            qkv=torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).contiguous(),
            qkv_bias=torch.cat(biases).contiguous() if all(b is not None for b in biases) else None,
            o=attn.o_proj.weight,
            o_bias=attn.o_proj.bias,
            post_norm=layer.post_attention_layernorm.weight,
            gate_up=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).contiguous(),
            down=mlp.down_proj.weight,
            window=window or 0,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        sample_rows: torch.Tensor | None,
        attention: Attention,
    ) -> torch.Tensor:
        """input_ids, positions [T]; sample_rows [S] rows whose next token is wanted (None: every row).
        Returns logits [S, vocab] in float32."""
        ops = self.kernels
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        hidden = F.embedding(input_ids, self.embed)
        cos, sin = self.cos[positions], self.sin[positions]
        residual = None
        for index, layer in enumerate(self.layers):
            x, residual = ops.rms_norm(hidden, layer.input_norm, self.eps, residual)
            qkv = F.linear(x, layer.qkv, layer.qkv_bias)
            q = qkv[:, :q_size].reshape(-1, self.heads, self.head_dim)
            k = qkv[:, q_size : q_size + kv_size].reshape(-1, self.kv_heads, self.head_dim)
            v = qkv[:, q_size + kv_size :].reshape(-1, self.kv_heads, self.head_dim)
            ops.rotary(q, k, cos, sin)
            attended = attention(index, q, k, v, self.scale, layer.window)
            hidden = F.linear(attended.reshape(-1, q_size), layer.o, layer.o_bias)
            x, residual = ops.rms_norm(hidden, layer.post_norm, self.eps, residual)
            gate, up = F.linear(x, layer.gate_up).chunk(2, dim=-1)
            hidden = F.linear(F.silu(gate) * up, layer.down)
        if sample_rows is not None:
            hidden, residual = hidden[sample_rows], residual[sample_rows]
        x, _ = ops.rms_norm(hidden, self.norm, self.eps, residual)
        return F.linear(x, self.lm_head).float()


def _rotary_tables(rotary: torch.nn.Module, config, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max positions, head_dim] from the model's own rotary module, in the model's dtype (as
    transformers casts them before applying)."""
    positions = torch.arange(config.max_position_embeddings, device=like.device)[None, :]
    with torch.no_grad():
        cos, sin = rotary(like[:1][None], positions)
    return cos[0].to(like.dtype).contiguous(), sin[0].to(like.dtype).contiguous()


def reduce_decode_attention(
    queries: torch.Tensor,
    key_pool: torch.Tensor,
    value_pool: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    window: int,
) -> torch.Tensor:
    """One query per sequence over its pages, as reductions inductor fuses with the gather; the signature of
    the kernels' decode_attention. queries [B, heads, dim]; pools [kv_heads, blocks, block_size, dim];
    block_tables [B, W]."""
    batch, heads, dim = queries.shape
    kv_heads, _, block_size, _ = key_pool.shape
    width = block_tables.shape[1]
    flat = block_tables.reshape(-1)
    keys = key_pool.index_select(1, flat).view(kv_heads, batch, 1, width * block_size, dim)
    values = value_pool.index_select(1, flat).view(kv_heads, batch, 1, width * block_size, dim)
    q = queries.view(batch, kv_heads, heads // kv_heads, 1, dim).transpose(0, 1).float()
    scores = (q * keys.float()).sum(-1) * scale  # [kv_heads, batch, group, L]
    positions = torch.arange(width * block_size, device=queries.device)
    visible = positions[None, :] < context_lens[:, None]
    if window:
        visible = visible & (positions[None, :] >= context_lens[:, None] - window)
    scores = scores.masked_fill(~visible[None, :, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = (probs[..., None] * values.float()).sum(-2)  # [kv_heads, batch, group, dim]
    return out.transpose(0, 1).reshape(batch, heads, dim).to(queries.dtype)
