"""Chunked log-probs from hidden states: lm_head → log-softmax → gather, a chunk of positions
at a time, so that a full [B, T, V] fp32 logits tensor is never held (V = 151,936 for Qwen3).

The backward pass recomputes each chunk's logits from the saved hidden states, so peak memory
is O(chunk_size · V) in the forward and in the backward, whatever B·T is.
"""

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lit_opd.losses import _jsd


def _accumulation_dtype(hidden: Tensor) -> torch.dtype:
    """float64 stays float64 (for gradcheck); everything else is accumulated in float32."""
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


class _SupportLogProbs(torch.autograd.Function):
    """log softmax(h W^T)[index], chunked over the N rows; exact gradient by recomputation."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, index: Tensor, chunk_size: int) -> Tensor:
        N = hidden.shape[0]
        acc = _accumulation_dtype(hidden)
        out = torch.empty(index.shape, dtype=acc, device=hidden.device)
        lse = torch.empty(N, dtype=acc, device=hidden.device)
        for start in range(0, N, chunk_size):
            end = min(start + chunk_size, N)
            logits = (hidden[start:end] @ weight.T).to(acc)
            lse[start:end] = torch.logsumexp(logits, dim=-1)
            out[start:end] = logits.gather(1, index[start:end]) - lse[start:end, None]
        ctx.save_for_backward(hidden, weight, index, lse)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        hidden, weight, index, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        acc = lse.dtype
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
        N = hidden.shape[0]
        for start in range(0, N, ctx.chunk_size):
            end = min(start + ctx.chunk_size, N)
            h = hidden[start:end]
            probs = torch.exp((h @ weight.T).to(acc) - lse[start:end, None])
            g = grad_out[start:end].to(acc)
            # d/dz_v Σ_k g_k (z_{i_k} − lse) = Σ_k g_k [v = i_k] − (Σ_k g_k) p_v
            grad_logits = probs.mul_(-g.sum(dim=-1, keepdim=True)).scatter_add_(1, index[start:end], g)
            if need_hidden:
                grad_hidden[start:end] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_weight:
                grad_weight += grad_logits.T @ h.to(acc)
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None


def support_logprobs(hidden: Tensor, weight: Tensor, support: Tensor, chunk_size: int = 1024) -> Tensor:
    """log π(v) for the given support tokens, from hidden states and the lm_head weight.

    hidden: [..., H]; weight: [V, H]; support: [..., K] long token ids.
    Returns [..., K] float32 (float64 for float64 input): log softmax(hidden · weightᵀ)[support]. Differentiable in hidden
    and weight; no [..., V] tensor beyond one chunk of chunk_size positions is ever held.
    """
    if hidden.shape[:-1] != support.shape[:-1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and support {tuple(support.shape)} disagree")
    lead = support.shape[:-1]
    out = _SupportLogProbs.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, support.reshape(-1, support.shape[-1]), chunk_size
    )
    return out.reshape(*lead, support.shape[-1])


def token_logprobs(hidden: Tensor, weight: Tensor, tokens: Tensor, chunk_size: int = 1024) -> Tensor:
    """log π(y) of the given tokens. hidden: [..., H]; weight: [V, H]; tokens: [...] long.
    Returns [...] float32, differentiable, chunked as `support_logprobs`."""
    return support_logprobs(hidden, weight, tokens.unsqueeze(-1), chunk_size).squeeze(-1)


@torch.no_grad()
def topk_logprobs(
    hidden: Tensor, weight: Tensor, k: int, chunk_size: int = 1024, exclude: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The top-k tokens and their full-vocabulary log-probs, chunked, without gradient.

    hidden: [..., H]; weight: [V, H]; exclude: token ids never chosen (their probability still
    counts in the normaliser). Returns (logp [..., k] float32, ids [..., k] long), sorted by
    decreasing probability.
    """
    lead = hidden.shape[:-1]
    flat = hidden.reshape(-1, hidden.shape[-1])
    values = torch.empty(flat.shape[0], k, dtype=_accumulation_dtype(hidden), device=hidden.device)
    ids = torch.empty(flat.shape[0], k, dtype=torch.long, device=hidden.device)
    for start in range(0, flat.shape[0], chunk_size):
        end = min(start + chunk_size, flat.shape[0])
        logits = (flat[start:end] @ weight.T).to(values.dtype)
        normaliser = torch.logsumexp(logits, dim=-1, keepdim=True)
        if exclude is not None:
            logits[:, exclude.to(logits.device)] = float("-inf")
        top = torch.topk(logits, k, dim=-1)
        values[start:end] = top.values - normaliser
        ids[start:end] = top.indices
    return values.reshape(*lead, k), ids.reshape(*lead, k)


def _jsd_chunk(h_s: Tensor, w_s: Tensor, h_t: Tensor, w_t: Tensor, beta: float, temperature: float) -> Tensor:
    acc = _accumulation_dtype(h_s)
    log_s = torch.log_softmax((h_s @ w_s.T).to(acc) / temperature, dim=-1)
    log_t = torch.log_softmax((h_t @ w_t.T).to(acc) / temperature, dim=-1)
    return _jsd(log_s, log_t, beta)


def chunked_generalized_jsd(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> Tensor:
    """Full-vocabulary generalised JSD(β) (as `losses.generalized_jsd`) from hidden states.

    student_hidden, teacher_hidden: [..., H_s], [..., H_t]; weights [V, H_s], [V, H_t].
    Returns [...] float32 (float64 for float64 input). Each chunk is recomputed in the backward
    (activation checkpointing), so only one chunk's [chunk_size, V] logits are alive at a time.
    The teacher side is sg.
    """
    lead = student_hidden.shape[:-1]
    h_s = student_hidden.reshape(-1, student_hidden.shape[-1])
    h_t = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    w_t = teacher_weight.detach()
    pieces = []
    for start in range(0, h_s.shape[0], chunk_size):
        end = min(start + chunk_size, h_s.shape[0])
        pieces.append(
            checkpoint(_jsd_chunk, h_s[start:end], student_weight, h_t[start:end], w_t, beta, temperature,
                       use_reentrant=False)
        )
    return torch.cat(pieces).reshape(lead)


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """[B, L] positions counted over the attended tokens, as HF `generate` does for left padding."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


class CausalLMScorer(nn.Module):
    """A HF causal LM seen as a scorer of responses: hidden states of the positions that predict
    the response tokens, and chunked log-probs from them.

    Every student forward goes through this module's `forward`, so that under FSDP2 the root
    unit (embeddings, final norm, lm_head) is gathered around the whole computation.
    """

    def __init__(self, model: nn.Module, chunk_size: int = 1024):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    @property
    def lm_head_weight(self) -> Tensor:
        return self.model.get_output_embeddings().weight

    def response_hidden(self, input_ids: Tensor, attention_mask: Tensor, response_len: int) -> Tensor:
        """input_ids, attention_mask: [B, P+T] (prompt left-padded, response right-padded).
        Returns [B, T, H]: the final hidden state at each position that predicts a response token."""
        out = self.model.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask.long(),
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        )
        # A copy, not a view: FSDP2 root forwards must not return views of their own outputs.
        return out.last_hidden_state[:, -response_len - 1 : -1].clone()

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        response_len: int,
        support: Tensor | None = None,
        top_k: int = 0,
        exclude: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Returns {"logp": [B, T]} log π(y_t) of the response tokens (the last T of input_ids),
        plus {"support_logp": [B, T, K]} for a given support [B, T, K], and
        {"topk_logp", "topk_ids": [B, T, top_k]} when top_k > 0 (no gradient; never a token of
        `exclude`)."""
        hidden = self.response_hidden(input_ids, attention_mask, response_len)
        weight = self.lm_head_weight
        out = {"logp": token_logprobs(hidden, weight, input_ids[:, -response_len:], self.chunk_size)}
        if support is not None:
            out["support_logp"] = support_logprobs(hidden, weight, support, self.chunk_size)
        if top_k > 0:
            out["topk_logp"], out["topk_ids"] = topk_logprobs(hidden, weight, top_k, self.chunk_size, exclude)
        return out
