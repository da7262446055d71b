"""The model side of the static-KV-cache rollout engine: a forward pass over the live HF weights.

For HF causal LMs of the Llama family (Llama, Qwen2, Qwen3): which models it can run
(`unsupported_reason`), RMSNorm and RoPE as HF computes them, `Decoder` (references to the live
weights, read on every call with no copy, so optimiser steps are seen at once, and the forward
pass over a static KV cache), `KVCache` (the pre-allocated keys and values) and `sample_tokens`
(temperature → top-k → top-p, the order of HF `generate`, drawn by the exponential race
argmax_v q_v / E_v, E_v ~ Exp(1), so no step reads a value back to the host).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_opd.rollout.engine import SamplingConfig

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
# RoPE types whose inverse frequencies do not depend on the sequence length: one table serves all positions.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")

Linear = tuple[Tensor, Tensor | None]


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the static-KV-cache engine cannot run `model` (then it falls back to HF `generate`), or None."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES or not hasattr(model, "lm_head"):
        return f"architecture {type(model).__name__} (model_type {model_type!r}) is not one of {SUPPORTED_MODEL_TYPES}"
    layer_types = getattr(config, "layer_types", None) or []
    if any(kind != "full_attention" for kind in layer_types):
        return f"{type(model).__name__} has sliding-window layers"
    rope_type = getattr(model.model.rotary_emb, "rope_type", None)
    if rope_type not in STATIC_ROPE_TYPES:
        return f"RoPE type {rope_type!r} is not one of {STATIC_ROPE_TYPES}"
    if any(type(p).__name__ == "DTensor" for p in model.parameters()):
        return "the parameters are sharded (DTensor)"
    return None


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """HF's RMSNorm, op for op: w · x / sqrt(mean(x²) + eps), normalised in float32 and cast back before
    the scale. x: [..., N]; weight: [N]."""
    normed = F.rms_norm(x.float(), x.shape[-1:], eps=eps)
    return weight * normed.to(x.dtype)


def apply_rope(x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    """x · cos + rotate_half(x) · sin, as HF: with sin_signed = (−sin₁, sin₂) the rotation is a roll by D/2.

    x: [B, S, H, D]; cos, sin_signed: [B, S, 1, D].
    """
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin_signed)


@dataclass(frozen=True)
class _Layer:
    input_norm: Tensor
    q_proj: Linear
    k_proj: Linear
    v_proj: Linear
    o_proj: Linear
    q_norm: Tensor | None
    k_norm: Tensor | None
    post_norm: Tensor
    gate_proj: Linear
    up_proj: Linear
    down_proj: Linear


def _linear(module: nn.Linear) -> Linear:
    return module.weight, module.bias


def _layer(layer: nn.Module) -> _Layer:
    """The live weights of one HF decoder layer (no copy)."""
    attention, mlp = layer.self_attn, layer.mlp
    return _Layer(
        input_norm=layer.input_layernorm.weight, post_norm=layer.post_attention_layernorm.weight,
        q_proj=_linear(attention.q_proj), k_proj=_linear(attention.k_proj),
        v_proj=_linear(attention.v_proj), o_proj=_linear(attention.o_proj),
        q_norm=attention.q_norm.weight if hasattr(attention, "q_norm") else None,
        k_norm=attention.k_norm.weight if hasattr(attention, "k_norm") else None,
        gate_proj=_linear(mlp.gate_proj), up_proj=_linear(mlp.up_proj), down_proj=_linear(mlp.down_proj),
    )


class Decoder:
    """References to the live weights of a Llama-family HF causal LM (no copy) and its forward pass
    over a static KV cache."""

    def __init__(self, model: nn.Module):
        base, config = model.model, model.config
        self.layers = [_layer(layer) for layer in base.layers[: config.num_hidden_layers]]
        self.embed = base.embed_tokens.weight
        self.final_norm = base.norm.weight
        self.lm_head = _linear(model.lm_head)
        self.act = base.layers[0].mlp.act_fn
        self.rotary = base.rotary_emb
        self.eps = config.rms_norm_eps
        attention = base.layers[0].self_attn
        self.head_dim = attention.head_dim
        self.scaling = attention.scaling
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.dtype = self.embed.dtype

    def weights(self) -> list[Tensor]:
        """Every tensor the forward reads (its addresses key a captured CUDA graph)."""
        tensors = [self.embed, self.final_norm, *self.lm_head]
        for layer in self.layers:
            for value in vars(layer).values():
                tensors.extend(value if isinstance(value, tuple) else (value,))
        return [t for t in tensors if t is not None]

    def rope_tables(self, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos, sin_signed: [length, D] for positions 0..length−1, from the model's own rotary module."""
        positions = torch.arange(length, device=device)[None]
        cos, sin = self.rotary(self.embed[:1], positions)
        half = self.head_dim // 2
        return cos[0], torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1)

    def forward(
        self, tokens: Tensor, positions: Tensor, cache: "KVCache", slots: Tensor, kv_len: int, attend: Tensor
    ) -> Tensor:
        """Logits of the last position, [B, V] float32, after writing the keys and values of `tokens` to `slots`.

        tokens, positions: [B, S]; slots: [S] cache columns for the S tokens; attend: [B, 1, S', kv_len] bool,
        True where a query may see a key (S' = S, or the Hkv/H query-group size in a decode step).
        """
        B, S = tokens.shape
        x = F.embedding(tokens, self.embed)
        cos, sin_signed = cache.cos[positions].unsqueeze(2), cache.sin_signed[positions].unsqueeze(2)
        for index, layer in enumerate(self.layers):
            h = rms_norm(x, layer.input_norm, self.eps)
            q = F.linear(h, *layer.q_proj).view(B, S, self.num_heads, self.head_dim)
            k = F.linear(h, *layer.k_proj).view(B, S, self.num_kv_heads, self.head_dim)
            v = F.linear(h, *layer.v_proj).view(B, S, self.num_kv_heads, self.head_dim)
            if layer.q_norm is not None:
                q, k = rms_norm(q, layer.q_norm, self.eps), rms_norm(k, layer.k_norm, self.eps)
            q, k = apply_rope(q, cos, sin_signed), apply_rope(k, cos, sin_signed)
            keys, values = cache.write(index, slots, k, v, kv_len)
            attention = self._attention(q, keys, values, attend)
            x = x.add_(F.linear(attention.reshape(B, S, -1), *layer.o_proj))
            h = rms_norm(x, layer.post_norm, self.eps)
            gated = self.act(F.linear(h, *layer.gate_proj)).mul_(F.linear(h, *layer.up_proj))
            x = x.add_(F.linear(gated, *layer.down_proj))
        h = rms_norm(x[:, -1], self.final_norm, self.eps)
        return F.linear(h, *self.lm_head).float()

    def _attention(self, q: Tensor, keys: Tensor, values: Tensor, attend: Tensor) -> Tensor:
        """softmax(q kᵀ · scaling + mask) v per head. q: [B, S, H, D]; keys, values: [B, Hkv, L, D].
        Returns [B, S, H, D]. A single query packs its H heads as Hkv groups of H/Hkv queries, so grouped
        keys are read once and the attention needs no GQA support."""
        B, S, H, D = q.shape
        if S == 1:
            grouped = q.view(B, self.num_kv_heads, H // self.num_kv_heads, D)
            out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=attend, scale=self.scaling)
            return out.view(B, 1, H, D)
        repeat = H // self.num_kv_heads
        keys = keys[:, :, None].expand(-1, -1, repeat, -1, -1).reshape(B, H, -1, D)
        values = values[:, :, None].expand(-1, -1, repeat, -1, -1).reshape(B, H, -1, D)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=attend, scale=self.scaling)
        return out.transpose(1, 2)


class KVCache:
    """Pre-allocated keys and values [layers, B, Hkv, length, D], the RoPE tables for its positions, and
    `valid` [B, length] bool: which columns hold a real token (left padding and unwritten columns do not)."""

    def __init__(self, decoder: Decoder, batch: int, length: int, device: torch.device):
        shape = (len(decoder.layers), batch, decoder.num_kv_heads, length, decoder.head_dim)
        # Under autocast the projections, hence the keys and values, come out in the autocast dtype.
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else decoder.dtype
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(batch, length, dtype=torch.bool, device=device)
        self.cos, self.sin_signed = decoder.rope_tables(length, device)

    def write(self, layer: int, slots: Tensor, k: Tensor, v: Tensor, kv_len: int) -> tuple[Tensor, Tensor]:
        """Store k, v ([B, S, Hkv, D]) in columns `slots`; return this layer's first kv_len columns."""
        keys, values = self.keys[layer], self.values[layer]
        keys.index_copy_(2, slots, k.transpose(1, 2).to(keys.dtype))
        values.index_copy_(2, slots, v.transpose(1, 2).to(values.dtype))
        return keys[:, :, :kv_len], values[:, :, :kv_len]


def sample_tokens(logits: Tensor, sampling: SamplingConfig, uniform: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Draw one token per row; no value goes back to the host.

    logits: [B, V] float32; uniform: [B, V] i.i.d. U(0, 1) draws (None when greedy).
    The sampling distribution q is softmax(logits / temperature) restricted to the top_k tokens, then to
    the smallest set of most likely tokens whose mass reaches top_p, renormalised (HF's order). The draw
    is the exponential race argmax_v q_v / E_v with E_v = −log U_v ~ Exp(1), which is distributed as q;
    U is floored at the smallest normal float so that every E_v is finite and positive, hence a token
    with q_v = 0 never wins. temperature 0 is argmax of the logits.
    Returns tokens [B] long, logp [B] = log softmax(logits) of the tokens (untempered), and
    sample_logp [B] = log q of the tokens (0 when greedy: q is a point mass).
    """
    logp_all = torch.log_softmax(logits, dim=-1)
    if sampling.temperature == 0:
        tokens = logits.argmax(dim=-1)
        return tokens, logp_all.gather(1, tokens[:, None])[:, 0], torch.zeros_like(logp_all[:, 0])
    scaled = logits if sampling.temperature == 1 else logits / sampling.temperature
    if 0 < sampling.top_k < scaled.shape[-1]:
        values, indices = scaled.topk(sampling.top_k, dim=-1)
        kept = torch.full_like(scaled, float("-inf")).scatter_(1, indices, _top_p_filter(values, sampling.top_p))
    elif sampling.top_p < 1:
        values, indices = scaled.sort(dim=-1, descending=True)
        kept = torch.empty_like(scaled).scatter_(1, indices, _top_p_filter(values, sampling.top_p))
    else:
        kept = scaled
    sample_logp_all = logp_all if kept is logits else torch.log_softmax(kept, dim=-1)
    exponential = uniform.clamp(min=torch.finfo(uniform.dtype).tiny).log_().neg_()
    tokens = sample_logp_all.exp().div_(exponential).argmax(dim=-1)
    return tokens, logp_all.gather(1, tokens[:, None])[:, 0], sample_logp_all.gather(1, tokens[:, None])[:, 0]


def _top_p_filter(sorted_logits: Tensor, top_p: float) -> Tensor:
    """sorted_logits [B, K] in descending order, with −inf where the mass before a token already reaches
    top_p (the most likely token is always kept)."""
    if top_p >= 1:
        return sorted_logits
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    return sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
