"""Position losses ℓ_t of on-policy distillation, and the one reduction that turns them
into a scalar.

Shapes: B rows (rollouts), T response positions, K support tokens, V vocabulary.
`mask` is bool [B, T], True on response tokens that count (EOS included). Every returned
[B, T] tensor is 0 where `mask` is False. sg(.) is stop-gradient (`.detach()`).
"""

import math
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_opd._checks import check_finite, check_mask, check_nonempty, check_same_shape

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]
Reduction = Literal["token_mean", "sequence_mean"]


def sampled_token_opd(
    logp: Tensor,
    old_logp: Tensor,
    teacher_logp: Tensor,
    mask: Tensor,
    clip_eps: float | tuple[float, float] | None = None,
) -> Tensor:
    """Sampled-token OPD: the reverse-KL policy gradient on the sampled path.

    logp: [B, T] log π_θ(y_t) (carries the gradient); old_logp: [B, T] log π_old(y_t) of the
    behavior policy; teacher_logp: [B, T] log π_T(y_t).
        A_t = log π_T(y_t) − log π_old(y_t),   ρ_t = exp(logp_t − sg(old_logp_t))
        ℓ_t = −ρ_t · sg(A_t)                              (clip_eps None)
        ℓ_t = −min(ρ_t·A_t, clip(ρ_t, 1−ε_lo, 1+ε_hi)·A_t)   (clip_eps = ε or (ε_lo, ε_hi))
    On a rollout's first use ρ_t = 1 and ∇ℓ_t = sg(log π_θ − log π_T)·∇log π_θ.
    """
    check_mask(mask)
    check_same_shape("mask", mask.shape, logp=logp, old_logp=old_logp, teacher_logp=teacher_logp)
    check_finite(mask, logp=logp, old_logp=old_logp, teacher_logp=teacher_logp)
    logp, old_logp, teacher_logp = (_zero_padding(mask, x) for x in (logp, old_logp, teacher_logp))
    advantage = (teacher_logp - old_logp).detach()
    ratio = torch.exp(logp - old_logp.detach())
    loss = -ratio * advantage
    if clip_eps is not None:
        eps_lo, eps_hi = (clip_eps, clip_eps) if isinstance(clip_eps, (int, float)) else clip_eps
        clipped = -torch.clamp(ratio, 1.0 - eps_lo, 1.0 + eps_hi) * advantage
        loss = torch.maximum(loss, clipped)
    return loss.masked_fill(~mask, 0.0)


def bounded_sampled_token_opd(
    logp: Tensor,
    old_logp: Tensor,
    teacher_logp: Tensor,
    mask: Tensor,
    advantage_clip: float,
    ratio_clip: float,
) -> Tensor:
    """Sampled-token OPD with a bounded per-token weight, for rows whose behaviour log-probs are
    not their sampler's (teacher rollouts mixed in by phased teacher sampling: A_t can be several
    nats and ρ_t far from 1).

    logp, old_logp, teacher_logp: [B, T] as in `sampled_token_opd`; c = advantage_clip, ε = ratio_clip:
        Â_t = clip(A_t, −c, c),   ρ̄_t = clip(ρ_t, 1 − ε, 1 + ε)
        ℓ_t = −ρ_t · sg(ρ̄_t · Â_t / ρ_t)
    so the value is −ρ̄_t·Â_t and ∂ℓ_t/∂log π_θ(y_t) = −ρ̄_t·Â_t: the weight of the token's
    gradient is at most (1 + ε)·c in magnitude, and no token loses its gradient.
    """
    check_mask(mask)
    check_same_shape("mask", mask.shape, logp=logp, old_logp=old_logp, teacher_logp=teacher_logp)
    check_finite(mask, logp=logp, old_logp=old_logp, teacher_logp=teacher_logp)
    if advantage_clip <= 0 or not 0 <= ratio_clip < 1:
        raise ValueError(f"advantage_clip must be > 0 and ratio_clip in [0, 1), got {advantage_clip}, {ratio_clip}")
    logp, old_logp, teacher_logp = (_zero_padding(mask, x) for x in (logp, old_logp, teacher_logp))
    advantage = (teacher_logp - old_logp).detach().clamp(-advantage_clip, advantage_clip)
    ratio = torch.exp(logp - old_logp.detach())
    weight = ratio.detach().clamp(1.0 - ratio_clip, 1.0 + ratio_clip) * advantage
    return (-ratio * (weight / ratio.detach())).masked_fill(~mask, 0.0)


def _zero_padding(mask: Tensor, x: Tensor) -> Tensor:
    """x ([B, T] or [B, T, ...]) with 0 where mask is False. Padding may hold anything (NaN, ±inf);
    masking only the output would still let 0·NaN poison the backward pass."""
    return x.masked_fill(~mask.reshape(*mask.shape, *[1] * (x.dim() - 2)), 0.0)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − exp(x)) for x ≤ 0, stable at both ends, floored at log(tiny).

    Both branches of the `where` get inputs at which they and their gradients are finite (a
    NaN in the unused branch's backward still poisons the gradient); at x = 0 (the support
    holds all the mass) the floor makes the gradient 0 instead of NaN.
    """
    x = x.clamp(max=0.0)
    near_zero = x > -math.log(2.0)
    tiny = torch.finfo(x.dtype).tiny
    small_branch = torch.log((-torch.expm1(x)).clamp(min=tiny))
    large_branch = torch.log1p(-torch.exp(x.clamp(max=-math.log(2.0))))
    return torch.where(near_zero, small_branch, large_branch)


def _support_log_distribution(logp: Tensor, tail: bool) -> Tensor:
    """[B, T, K] full-vocabulary log-probs on S_t → a log distribution on S_t.

    tail=False: renormalise on S_t (log-softmax). tail=True: append the K+1-th category
    log(1 − Σ_{S_t} p) → [B, T, K+1].
    """
    if not tail:
        return torch.log_softmax(logp, dim=-1)
    rest = _log1mexp(torch.logsumexp(logp, dim=-1, keepdim=True))
    return torch.cat([logp, rest], dim=-1)


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p ‖ q) = Σ_k p_k (log p_k − log q_k) over the last dimension."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def _jsd(log_student: Tensor, log_teacher: Tensor, beta: float) -> Tensor:
    """Generalised JSD(β) = β·KL(T ‖ M) + (1−β)·KL(S ‖ M), M = β·T + (1−β)·S (GKD convention:
    β = 0 is forward KL(T ‖ S), β = 1 is reverse KL(S ‖ T))."""
    if beta == 0.0:
        return _kl(log_teacher, log_student)
    if beta == 1.0:
        return _kl(log_student, log_teacher)
    log_mixture = torch.logsumexp(
        torch.stack([log_student + math.log(1.0 - beta), log_teacher + math.log(beta)]), dim=0
    )
    return beta * _kl(log_teacher, log_mixture) + (1.0 - beta) * _kl(log_student, log_mixture)


def topk_lsm(
    student_logp: Tensor,
    teacher_logp: Tensor,
    mask: Tensor,
    divergence: Divergence = "reverse_kl",
    tail: bool = False,
    beta: float = 0.5,
    target_mix: Tensor | None = None,
) -> Tensor:
    """Teacher-TopK / local support matching (LSM) on the teacher's top-K support S_t.

    student_logp, teacher_logp: [B, T, K] full-vocabulary log-probs of the K support tokens
    (the gradient flows through student_logp; teacher_logp is a target, sg).
    p̂ = softmax over S_t (tail=False), or [p_1..p_K, 1 − Σ_K p] (tail=True), on both sides.
        reverse_kl: ℓ_t = KL(p̂_θ ‖ p̂_T)     forward_kl: ℓ_t = KL(p̂_T ‖ p̂_θ)
        jsd:        ℓ_t = generalised JSD(β) of p̂_θ and p̂_T (β=0 forward, β=1 reverse)
    target_mix λ [B, T] (SG-OPD on the top-K loss) replaces the target p̂_T by
        p* ∝ exp((1 − λ)·sg(log p̂_θ) + λ·log p̂_T)
    (λ > 1 extrapolates past the teacher, λ < 1 interpolates towards the student).
    Returns [B, T].
    """
    check_mask(mask)
    if student_logp.dim() != 3:
        raise ValueError(f"student_logp must be [B, T, K], got shape {tuple(student_logp.shape)}")
    check_same_shape("student_logp", student_logp.shape, teacher_logp=teacher_logp)
    if student_logp.shape[:2] != mask.shape:
        raise ValueError(
            f"student_logp is {tuple(student_logp.shape)} but mask is {tuple(mask.shape)}: "
            "the first two dimensions must match"
        )
    if divergence == "jsd" and not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    check_finite(mask, student_logp=student_logp, teacher_logp=teacher_logp)
    log_student = _support_log_distribution(_zero_padding(mask, student_logp), tail)
    log_teacher = _support_log_distribution(_zero_padding(mask, teacher_logp.detach()), tail)
    if target_mix is not None:
        check_same_shape("mask", mask.shape, target_mix=target_mix)
        lam = target_mix.detach().to(log_teacher.dtype).unsqueeze(-1)
        log_teacher = torch.log_softmax((1.0 - lam) * log_student.detach() + lam * log_teacher, dim=-1)
    if divergence == "reverse_kl":
        loss = _kl(log_student, log_teacher)
    elif divergence == "forward_kl":
        loss = _kl(log_teacher, log_student)
    elif divergence == "jsd":
        loss = _jsd(log_student, log_teacher, beta)
    else:
        raise ValueError(f"divergence must be 'forward_kl', 'reverse_kl' or 'jsd', got {divergence!r}")
    return loss.masked_fill(~mask, 0.0)


def generalized_jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> Tensor:
    """Full-vocabulary generalised JSD of GKD (Agarwal et al.), per token, as TRL computes it.

    student_logits, teacher_logits: [B, T, V]. S = softmax(student/τ), T = softmax(teacher/τ),
    M = β·T + (1−β)·S;  ℓ_t = β·KL(T ‖ M) + (1−β)·KL(S ‖ M); β=0 → KL(T ‖ S) (forward),
    β=1 → KL(S ‖ T) (reverse). The teacher side is a target (sg). Returns [B, T].
    """
    check_mask(mask)
    if student_logits.dim() != 3:
        raise ValueError(f"student_logits must be [B, T, V], got shape {tuple(student_logits.shape)}")
    check_same_shape("student_logits", student_logits.shape, teacher_logits=teacher_logits)
    if student_logits.shape[:2] != mask.shape:
        raise ValueError(
            f"student_logits is {tuple(student_logits.shape)} but mask is {tuple(mask.shape)}"
        )
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if temperature <= 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    check_finite(mask, student_logits=student_logits, teacher_logits=teacher_logits)
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    student_logits = _zero_padding(mask, student_logits).to(dtype)
    teacher_logits = _zero_padding(mask, teacher_logits.detach()).to(dtype)
    log_student = torch.log_softmax(student_logits / temperature, dim=-1)
    log_teacher = torch.log_softmax(teacher_logits / temperature, dim=-1)
    return _jsd(log_student, log_teacher, beta).masked_fill(~mask, 0.0)


def truncated_importance_weight(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, cap: float) -> Tensor:
    """w_t = min(π_old(y_t) / π_rollout(y_t), C): the per-token correction for a rollout engine
    whose probabilities differ from the trainer's (as verl's rollout correction), sg, 0 off the mask.
    old_logp, rollout_logp, mask: [B, T]; cap C > 0."""
    check_same_shape("mask", mask.shape, old_logp=old_logp, rollout_logp=rollout_logp)
    log_ratio = _zero_padding(mask, (old_logp - rollout_logp).detach())
    return _zero_padding(mask, torch.exp(log_ratio.clamp(max=math.log(cap))))


def gated_reduce(
    position_loss: Tensor,
    gates: Sequence[Tensor],
    mask: Tensor,
    reduction: Reduction = "token_mean",
    normalizer: float | Tensor | None = None,
) -> Tensor:
    """Compose gates with position losses and reduce to a scalar.

    position_loss: [B, T] ℓ_t; gates: [B, T] tensors g_t, composed by product (detached);
        token_mean:    Σ_t g_t m_t ℓ_t / Σ_t m_t
        sequence_mean: Σ_b (Σ_t g m ℓ / Σ_t m) / B'   (B' rows with at least one valid token)
    `normalizer` replaces the denominator (Σ m or B'): pass the count over the whole global
    batch (all micro-batches of an optimiser step, all ranks) so that gradient accumulation
    and data parallelism do not change the objective.
    """
    check_mask(mask)
    check_same_shape("mask", mask.shape, position_loss=position_loss)
    gate = torch.ones_like(position_loss)
    for g in gates:
        check_same_shape("mask", mask.shape, gate=g)
        gate = gate * g.detach()
    weighted = _zero_padding(mask, gate) * _zero_padding(mask, position_loss)
    if reduction == "token_mean":
        numerator = weighted.sum()
        count = mask.sum()
    elif reduction == "sequence_mean":
        lengths = mask.sum(dim=1)
        numerator = (weighted.sum(dim=1) / lengths.clamp(min=1)).sum()
        count = (lengths > 0).sum()
    else:
        raise ValueError(f"reduction must be 'token_mean' or 'sequence_mean', got {reduction!r}")
    if normalizer is None:
        check_nonempty(mask)
        normalizer = count
    return numerator / normalizer
