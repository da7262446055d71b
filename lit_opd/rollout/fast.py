"""The fast rollout backend: a static KV cache and a lean decode step over the live HF weights.

For HF causal LMs of the Llama family (Llama, Qwen2, Qwen3) the engine runs its own forward
pass, reading the weights straight from the HF modules on every call (no copy, so optimiser
steps are seen at once): a prefill of the left-padded prompts fills a pre-allocated KV cache,
then one decode step per token appends to it. Sampling (temperature → top-k → top-p, the order
of HF `generate`) draws with the exponential race argmax_v q_v / E_v, E_v ~ Exp(1), from the
caller's generator, so no step reads a value back to the host; whether every row has stopped is
checked every token on CPU and every `done_check_interval` tokens on CUDA. On CUDA the decode step
can be captured in CUDA graphs (`cuda_graphs=True`) and replayed per token; on CPU it runs in C++
kernels (`lit_opd.rollout.cpu_kernels`; in bfloat16 the weight matmuls stay PyTorch's). Architectures, RoPE
types or attention patterns it does not implement go to HF `generate`, with one logged warning.
"""

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_opd.rollout import cpu_kernels
from lit_opd.rollout.engine import Generation, HFGenerateEngine, RolloutEngine, SamplingConfig

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
# MLP activations the fused CPU decode step implements (others decode with PyTorch ops).
SILU_ACTIVATIONS = ("silu", "swish")
# RoPE types whose inverse frequencies do not depend on the sequence length: one table serves all positions.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")

Linear = tuple[Tensor, Tensor | None]


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the fast engine cannot run `model` (then it falls back to HF `generate`), or None."""
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


class _Decoder:
    """References to the live weights of a Llama-family HF causal LM (no copy) and its forward pass
    over a static KV cache."""

    def __init__(self, model: nn.Module, cpu_kernel: bool):
        base, config = model.model, model.config
        self.layers = [
            _Layer(
                input_norm=layer.input_layernorm.weight,
                q_proj=_linear(layer.self_attn.q_proj),
                k_proj=_linear(layer.self_attn.k_proj),
                v_proj=_linear(layer.self_attn.v_proj),
                o_proj=_linear(layer.self_attn.o_proj),
                q_norm=layer.self_attn.q_norm.weight if hasattr(layer.self_attn, "q_norm") else None,
                k_norm=layer.self_attn.k_norm.weight if hasattr(layer.self_attn, "k_norm") else None,
                post_norm=layer.post_attention_layernorm.weight,
                gate_proj=_linear(layer.mlp.gate_proj),
                up_proj=_linear(layer.mlp.up_proj),
                down_proj=_linear(layer.mlp.down_proj),
            )
            for layer in base.layers[: config.num_hidden_layers]
        ]
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
        self.cpu_kernel = cpu_kernel
        self.silu = getattr(config, "hidden_act", None) in SILU_ACTIVATIONS

    def weights(self) -> list[Tensor]:
        """Every tensor the forward reads (its addresses key a captured CUDA graph)."""
        tensors = [self.embed, self.final_norm, *self.lm_head]
        for layer in self.layers:
            for value in vars(layer).values():
                tensors.extend(value if isinstance(value, tuple) else (value,))
        return [t for t in tensors if t is not None]

    def fuses_cpu_decode(self, device: torch.device) -> bool:
        """Whether decode steps run through the C++ kernels of `cpu_kernels` (`decode_cpu`): on CPU with
        the kernels on and built, no autocast, a SiLU MLP and every weight in one dtype they implement."""
        return (
            self.cpu_kernel
            and device.type == "cpu"
            and not torch.is_autocast_enabled("cpu")
            and self.silu
            and self.dtype in cpu_kernels.DTYPES
            and all(t.device.type == "cpu" and t.dtype == self.dtype for t in self.weights())
            and cpu_kernels.load() is not None
        )

    def rope_tables(self, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos, sin_signed: [length, D] for positions 0..length−1, from the model's own rotary module."""
        positions = torch.arange(length, device=device)[None]
        cos, sin = self.rotary(self.embed[:1], positions)
        half = self.head_dim // 2
        return cos[0], torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1)

    def forward(
        self, tokens: Tensor, positions: Tensor, cache: "_KVCache", slots: Tensor, kv_len: int, attend: Tensor
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

    def decode_cpu(self, tokens: Tensor, positions: Tensor, cache: "_KVCache", slot: int, kv_len: int) -> Tensor:
        """`forward` for one new token per row, with everything in `cpu_kernels`: per layer one call for the
        residual add, RMSNorm and q, k, v projections, one for q/k-norm, RoPE, the cache write and attention,
        one for the o projection, one for the residual add, RMSNorm and MLP (float32; in bfloat16 the norms
        and the SiLU gating are kernels and the matmuls PyTorch's). tokens, positions: [B, 1]; slot: the cache
        column of the new token. Returns the logits [B, V] float32."""
        x = F.embedding(tokens[:, 0], self.embed)
        delta = None
        for index, layer in enumerate(self.layers):
            attention = cpu_kernels.decode_layer_attention(
                *self._norm_project(x, delta, layer.input_norm, layer.q_proj, layer.k_proj, layer.v_proj),
                layer.q_norm, layer.k_norm, cache.cos, cache.sin_signed, positions, cache.keys[index],
                cache.values[index], cache.valid, slot, kv_len, self.scaling, self.eps,
            )
            (delta,) = self._norm_project(attention, None, None, layer.o_proj)
            if self.dtype == torch.float32:
                delta = cpu_kernels.gated_mlp(
                    x, layer.gate_proj, layer.up_proj, layer.down_proj, layer.post_norm, delta, self.eps
                )
            else:
                gate, up = self._norm_project(x, delta, layer.post_norm, layer.gate_proj, layer.up_proj)
                delta = F.linear(cpu_kernels.silu_mul(gate, up), *layer.down_proj)
        (logits,) = self._norm_project(x, delta, self.final_norm, self.lm_head)
        return logits.float()

    def _norm_project(
        self, x: Tensor, delta: Tensor | None, norm: Tensor | None, *projections: Linear
    ) -> list[Tensor]:
        """[F.linear(h, weight, bias) for each projection], h = x, or with a norm add_rms_norm(x, delta, norm)
        (x ← x + delta in place): one `cpu_kernels.linear` call in float32."""
        if self.dtype == torch.float32:
            return cpu_kernels.linear(x, list(projections), norm, delta, self.eps)
        h = x if norm is None else cpu_kernels.add_rms_norm(x, delta, norm, self.eps)
        return [F.linear(h, *projection) for projection in projections]

    def _attention(self, q: Tensor, keys: Tensor, values: Tensor, attend: Tensor) -> Tensor:
        """softmax(q kᵀ · scaling + mask) v per head. q: [B, S, H, D]; keys, values: [B, Hkv, L, D].
        Returns [B, S, H, D]. A single query packs its H heads as Hkv groups of H/Hkv queries, so grouped
        keys are read once and no kernel needs GQA support; on CPU it goes to the decode-attention kernel."""
        B, S, H, D = q.shape
        if S == 1:
            grouped = q.view(B, self.num_kv_heads, H // self.num_kv_heads, D)
            out = None
            if self.cpu_kernel:
                out = cpu_kernels.decode_attention(grouped, keys, values, attend[:, 0, 0], self.scaling)
            if out is None:
                out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=attend, scale=self.scaling)
            return out.view(B, 1, H, D)
        repeat = H // self.num_kv_heads
        keys = keys[:, :, None].expand(-1, -1, repeat, -1, -1).reshape(B, H, -1, D)
        values = values[:, :, None].expand(-1, -1, repeat, -1, -1).reshape(B, H, -1, D)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=attend, scale=self.scaling)
        return out.transpose(1, 2)


class _KVCache:
    """Pre-allocated keys and values [layers, B, Hkv, length, D], the RoPE tables for its positions, and
    `valid` [B, length] bool: which columns hold a real token (left padding and unwritten columns do not)."""

    def __init__(self, decoder: _Decoder, batch: int, length: int, device: torch.device):
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
    return (
        tokens,
        logp_all.gather(1, tokens[:, None])[:, 0],
        sample_logp_all.gather(1, tokens[:, None])[:, 0],
    )


def _top_p_filter(sorted_logits: Tensor, top_p: float) -> Tensor:
    """sorted_logits [B, K] in descending order, with −inf where the mass before a token already reaches
    top_p (the most likely token is always kept)."""
    if top_p >= 1:
        return sorted_logits
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    return sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))


class _Rollout:
    """The device state of one batch of rollouts: the KV cache, the next input, the per-row stop flags,
    the step counter s and the output buffers [B, N]. A decode step reads and writes only these tensors,
    so a CUDA graph can replay it; the prefill resets them, so one _Rollout serves call after call."""

    def __init__(
        self,
        decoder: _Decoder,
        batch: int,
        prompt_len: int,
        sampling: SamplingConfig,
        eos_token_ids: list[int],
        pad_token_id: int,
        device: torch.device,
    ):
        self.decoder, self.sampling, self.pad_token_id = decoder, sampling, pad_token_id
        self.fused = decoder.fuses_cpu_decode(device)
        self.prompt_len, self.max_new = prompt_len, sampling.max_new_tokens
        # The last sampled token is never fed back, so the cache needs P + N − 1 columns.
        self.cache = _KVCache(decoder, batch, prompt_len + self.max_new - 1, device)
        self.eos = torch.tensor(eos_token_ids, dtype=torch.long, device=device)
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.step = torch.zeros(1, dtype=torch.long, device=device)
        vocab = decoder.lm_head[0].shape[0]
        self.uniform = None if sampling.temperature == 0 else torch.empty(batch, vocab, device=device)
        self.out_ids = torch.full((batch, self.max_new), pad_token_id, dtype=torch.long, device=device)
        self.out_mask = torch.zeros(batch, self.max_new, dtype=torch.bool, device=device)
        self.out_logp = torch.zeros(batch, self.max_new, device=device)
        self.out_sample_logp = torch.zeros(batch, self.max_new, device=device)

    @property
    def length(self) -> int:
        """Columns of the KV cache."""
        return self.cache.keys.shape[3]

    def prefill(self, prompt_ids: Tensor, prompt_mask: Tensor, generator: torch.Generator) -> None:
        """Run the [B, P] prompts through the model, filling cache columns 0..P−1, and sample response
        token 0. Positions are cumsum(mask) − 1, as HF `generate` gives them to left-padded rows."""
        P, device = self.prompt_len, prompt_ids.device
        self.cache.valid.zero_()
        self.cache.valid[:, :P] = prompt_mask
        positions = (prompt_mask.long().cumsum(dim=1) - 1).clamp(min=0)
        causal = torch.ones(P, P, dtype=torch.bool, device=device).tril()
        # A padding query also sees itself, so that no softmax row is empty (its output is never read).
        attend = (causal & prompt_mask[:, None, None, :]) | torch.eye(P, dtype=torch.bool, device=device)
        slots = torch.arange(P, device=device)
        logits = self.decoder.forward(prompt_ids, positions, self.cache, slots, P, attend)
        self.positions.copy_(positions[:, -1:])
        self.done.zero_()
        self.step.zero_()
        self.draw(generator)
        self.sample(logits)

    def draw(self, generator: torch.Generator) -> None:
        """Fresh uniform draws for the next sampled token (outside any CUDA graph: the generator is the
        caller's)."""
        if self.uniform is not None:
            self.uniform.uniform_(generator=generator)

    def decode(self, kv_len: int) -> None:
        """Step s ≥ 1: feed the last sampled token (cache column P+s−1) and sample response token s.
        kv_len: how many cache columns attention reads (≥ P+s; more are masked)."""
        self.step += 1
        self.positions += 1
        slot = self.step + (self.prompt_len - 1)
        self.cache.valid.index_fill_(1, slot, True)
        if self.fused:
            logits = self.decoder.decode_cpu(self.tokens, self.positions, self.cache, int(slot), kv_len)
        else:
            attend = self.cache.valid[:, None, None, :kv_len]
            logits = self.decoder.forward(self.tokens, self.positions, self.cache, slot, kv_len, attend)
        self.sample(logits)

    def sample(self, logits: Tensor) -> None:
        """Sample response token s for every row; finished rows get padding, log-probs 0 and a False mask."""
        if self.fused:
            s = self.sampling
            cpu_kernels.sample_tokens(
                logits, self.uniform, s.temperature, s.top_k, s.top_p, self.done, self.eos, self.pad_token_id,
                int(self.step), self.out_ids, self.out_mask, self.out_logp, self.out_sample_logp, self.tokens,
            )
            return
        tokens, logp, sample_logp = sample_tokens(logits, self.sampling, self.uniform)
        tokens = tokens.masked_fill(self.done, self.pad_token_id)
        self.out_ids.index_copy_(1, self.step, tokens[:, None])
        self.out_mask.index_copy_(1, self.step, ~self.done[:, None])
        self.out_logp.index_copy_(1, self.step, logp.masked_fill(self.done, 0)[:, None])
        self.out_sample_logp.index_copy_(1, self.step, sample_logp.masked_fill(self.done, 0)[:, None])
        self.done |= (tokens[:, None] == self.eos).any(dim=1)
        self.tokens.copy_(tokens[:, None])

    def finished(self, steps: int, check_interval: int) -> bool:
        """After `steps` sampled tokens: all N are sampled, or every row has stopped (looked at every
        check_interval steps only, as looking waits for the device)."""
        return steps >= self.max_new or (steps % check_interval == 0 and bool(self.done.all()))

    def result(self, steps: int) -> Generation:
        """The first `steps` columns, trimmed to the longest response."""
        mask = self.out_mask[:, :steps]
        length = int(mask.sum(dim=1).max())
        return Generation(
            response_ids=self.out_ids[:, :length].clone(),
            response_mask=mask[:, :length].clone(),
            logp=self.out_logp[:, :length].clone(),
            sample_logp=self.out_sample_logp[:, :length].clone(),
        )


@dataclass
class _Graphs:
    """Captured decode steps for one rollout shape: graphs[i] attends over the first kv_lens[i] columns."""

    key: tuple
    rollout: _Rollout
    kv_lens: list[int]
    graphs: list[torch.cuda.CUDAGraph]


class StaticCacheEngine(RolloutEngine):
    """Fast backend for Llama / Qwen2 / Qwen3 HF causal LMs: static KV cache, own decode step, batched
    sampling with no host sync per token; other models go to HF `generate` (logged once per reason).

    cuda_graphs: on CUDA, capture the decode step in CUDA graphs and replay them, one per token (ignored
        on CPU). Attention in a graph reads a fixed number of cache columns, so one graph is captured per
        `graph_kv_bucket` columns of cache and each step replays the shortest that covers it. The graphs
        are kept for the next call with the same batch size, padded prompt length, sampling config, EOS
        ids, autocast state and weight addresses (in-place optimiser steps keep the addresses); prompts
        are left-padded to a multiple of `prompt_bucket` so that new prompt lengths rarely force a capture.
    done_check_interval: on CUDA, tokens between checks whether every row has stopped (each check waits
        for the device); on CPU the check is every token, where it costs nothing.
    cpu_decode_kernels: on CPU, decode steps run in the C++ kernels of `lit_opd.rollout.cpu_kernels`
        (built on first use; see benchmarks/rollout.py for the gain over the same engine on PyTorch ops):
        everything in float32, everything but the weight matmuls in bfloat16; under autocast only the
        attention; where they do not apply or cannot be built, PyTorch's ops.
    """

    def __init__(
        self,
        cuda_graphs: bool = False,
        done_check_interval: int = 16,
        prompt_bucket: int = 64,
        graph_kv_bucket: int = 256,
        cpu_decode_kernels: bool = True,
    ):
        for name, value in (
            ("done_check_interval", done_check_interval),
            ("prompt_bucket", prompt_bucket),
            ("graph_kv_bucket", graph_kv_bucket),
        ):
            if value < 1:
                raise ValueError(f"{name} must be ≥ 1, got {value}")
        self.cuda_graphs = cuda_graphs
        self.cpu_decode_kernels = cpu_decode_kernels
        self.done_check_interval = done_check_interval
        self.prompt_bucket = prompt_bucket
        self.graph_kv_bucket = graph_kv_bucket
        self.fallback = HFGenerateEngine()
        self._warned: set[str] = set()
        self._graphs: _Graphs | None = None

    def generate(self, model, prompt_ids, prompt_mask, sampling, eos_token_ids, pad_token_id, generator):
        reason = unsupported_reason(model)
        if reason is not None:
            if reason not in self._warned:
                self._warned.add(reason)
                log.warning("StaticCacheEngine falls back to HF generate: %s", reason)
            return self.fallback.generate(
                model, prompt_ids, prompt_mask, sampling, eos_token_ids, pad_token_id, generator
            )
        if prompt_mask.dtype != torch.bool or prompt_mask.shape != prompt_ids.shape:
            raise ValueError(
                f"prompt_mask must be a bool tensor shaped like prompt_ids {tuple(prompt_ids.shape)}, "
                f"got {prompt_mask.dtype} {tuple(prompt_mask.shape)}"
            )
        if not bool(prompt_mask[:, -1].all()):
            raise ValueError("prompts must be left-padded: the last column of prompt_mask must be all True")
        generator = _on_device(generator, prompt_ids.device)
        decoder = _Decoder(model, self.cpu_decode_kernels)
        args = (decoder, prompt_ids, prompt_mask, sampling, list(eos_token_ids), pad_token_id, generator)
        with torch.no_grad():
            if self.cuda_graphs and prompt_ids.device.type == "cuda" and sampling.max_new_tokens > 1:
                return self._generate_graphed(*args)
            return self._generate_eager(*args)

    def _generate_eager(self, decoder, prompt_ids, prompt_mask, sampling, eos_token_ids, pad_token_id, generator):
        B, P = prompt_ids.shape
        rollout = _Rollout(decoder, B, P, sampling, eos_token_ids, pad_token_id, prompt_ids.device)
        rollout.prefill(prompt_ids, prompt_mask, generator)
        interval = 1 if prompt_ids.device.type == "cpu" else self.done_check_interval
        steps = 1
        while not rollout.finished(steps, interval):
            rollout.draw(generator)
            rollout.decode(kv_len=P + steps)
            steps += 1
        return rollout.result(steps)

    def _generate_graphed(self, decoder, prompt_ids, prompt_mask, sampling, eos_token_ids, pad_token_id, generator):
        pad_columns = -prompt_ids.shape[1] % self.prompt_bucket
        prompt_ids = F.pad(prompt_ids, (pad_columns, 0), value=pad_token_id)
        prompt_mask = F.pad(prompt_mask, (pad_columns, 0), value=False)
        B, P = prompt_ids.shape
        device = prompt_ids.device
        key = (
            B, P, sampling, tuple(eos_token_ids), pad_token_id, device,
            torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type),
            tuple(t.data_ptr() for t in decoder.weights()),
        )
        if self._graphs is None or self._graphs.key != key:
            self._graphs = None  # frees the old graphs' memory before capturing new ones
            rollout = _Rollout(decoder, B, P, sampling, eos_token_ids, pad_token_id, device)
            kv_lens = list(range(P + self.graph_kv_bucket, rollout.length, self.graph_kv_bucket)) + [rollout.length]
            self._graphs = _Graphs(key, rollout, kv_lens, _capture_decode_steps(rollout, kv_lens))
        rollout, kv_lens, graphs = self._graphs.rollout, self._graphs.kv_lens, self._graphs.graphs
        rollout.prefill(prompt_ids, prompt_mask, generator)
        steps, bucket = 1, 0
        while not rollout.finished(steps, self.done_check_interval):
            while kv_lens[bucket] < P + steps:
                bucket += 1
            rollout.draw(generator)
            graphs[bucket].replay()
            steps += 1
        return rollout.result(steps)


def _capture_decode_steps(rollout: _Rollout, kv_lens: list[int]) -> list[torch.cuda.CUDAGraph]:
    """One CUDA graph of `rollout.decode(kv_len)` per kv_len, sharing one memory pool (they never run
    at once and pass no tensor to each other). Each is warmed up on a side stream first, as
    torch.cuda.graphs asks; the warm-ups leave junk in the state, which the next prefill resets. They
    sample from fixed noise, not the caller's generator, so that a capture does not change which
    rollouts a seed gives. Autocast's weight-cast cache is off while capturing: a cast made before the
    capture would be replayed from stale memory instead of being re-done from the live weights."""
    device = rollout.cache.keys.device
    autocast = torch.autocast(
        device.type,
        dtype=torch.get_autocast_dtype(device.type),
        enabled=torch.is_autocast_enabled(device.type),
        cache_enabled=False,
    )
    if rollout.uniform is not None:
        rollout.uniform.fill_(0.5)
    graphs, pool = [], None
    with autocast:
        for kv_len in kv_lens:
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                rollout.step.zero_()
                rollout.decode(kv_len)
            torch.cuda.current_stream(device).wait_stream(stream)
            rollout.step.zero_()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                rollout.decode(kv_len)
            pool = graph.pool()
            graphs.append(graph)
    return graphs


def _on_device(generator: torch.Generator, device: torch.device) -> torch.Generator:
    """`generator` if it draws on `device`, else a generator there seeded from it (still deterministic)."""
    if generator.device.type == device.type:
        return generator
    seeded = torch.Generator(device=device)
    seeded.manual_seed(int(torch.randint(0, 2**62, (), generator=generator)))
    return seeded
