"""Position losses and their reduction: hand-computed values, gradients, invariants, bad input.

Every expected number below was worked out from the formula with math.log / math.exp on paper-sized
inputs (the derivation is in the comment next to it), never by running the function under test.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lit_opd.losses import gated_reduce, generalized_jsd, sampled_token_opd, topk_lsm, truncated_importance_weight

NAN, INF = float("nan"), float("inf")
DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")


def as_logp(probs) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log()


# ---------------------------------------------------------------- sampled_token_opd

# Row 0: three valid tokens; row 1: two valid tokens and one padded slot (garbage in it).
OPD_LOGP = [[-1.0, -2.0, -0.5], [-0.3, -1.5, 7.0]]
OPD_OLD = [[-1.0, -2.5, -0.5], [-0.3, -1.0, NAN]]
OPD_TEACHER = [[-0.5, -2.0, -1.5], [-0.1, -1.2, INF]]
OPD_MASK = [[True, True, True], [True, True, False]]


def opd_inputs(requires_grad=True):
    logp = torch.tensor(OPD_LOGP, dtype=torch.float64, requires_grad=requires_grad)
    old = torch.tensor(OPD_OLD, dtype=torch.float64)
    teacher = torch.tensor(OPD_TEACHER, dtype=torch.float64)
    return logp, old, teacher, torch.tensor(OPD_MASK)


def test_sampled_token_opd_hand_values():
    logp, old, teacher, mask = opd_inputs()
    # ρ = exp(logp − old): [1, e^0.5 = 1.6487212707, 1], [1, e^−0.5 = 0.6065306597]
    # A = teacher − old:   [0.5, 0.5, −1.0],            [0.2, −0.2]
    # ℓ = −ρ·A:            [−0.5, −0.8243606354, 1.0],  [−0.2, 0.1213061319, 0 (padding)]
    expected = torch.tensor([[-0.5, -0.8243606353500641, 1.0], [-0.2, 0.1213061319425267, 0.0]], dtype=torch.float64)
    loss = sampled_token_opd(logp, old, teacher, mask)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)
    # dℓ/dlogp = −ρ·A = ℓ at valid positions; nothing (not NaN) flows into the padded slot.
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, expected, rtol=0, atol=1e-12)


def test_sampled_token_opd_symmetric_clip_hand_values():
    logp, old, teacher, mask = opd_inputs()
    # ε = 0.2. (0,1): ρ = 1.6487 > 1.2 with A = 0.5 > 0 → −min(0.8244, 1.2·0.5) = −0.6 (clipped).
    # (1,1): ρ = 0.6065 < 0.8 with A = −0.2 < 0 → −min(−0.1213, 0.8·(−0.2) = −0.16) = 0.16 (clipped).
    # Positions with ρ = 1 are inside the clip range and keep −A.
    expected = torch.tensor([[-0.5, -0.6, 1.0], [-0.2, 0.16, 0.0]], dtype=torch.float64)
    loss = sampled_token_opd(logp, old, teacher, mask, clip_eps=0.2)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)
    loss.sum().backward()
    # The clipped branch is constant in logp: zero gradient there, −ρA elsewhere.
    expected_grad = torch.tensor([[-0.5, 0.0, 1.0], [-0.2, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(logp.grad, expected_grad, rtol=0, atol=1e-12)


def test_sampled_token_opd_asymmetric_clip_hand_values():
    logp, old, teacher, mask = opd_inputs(requires_grad=False)
    # (ε_lo, ε_hi) = (0.1, 0.3): (0,1) → −1.3·0.5 = −0.65; (1,1) → −(0.9·(−0.2)) = 0.18.
    expected = torch.tensor([[-0.5, -0.65, 1.0], [-0.2, 0.18, 0.0]], dtype=torch.float64)
    loss = sampled_token_opd(logp, old, teacher, mask, clip_eps=(0.1, 0.3))
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)


def test_sampled_token_opd_clip_keeps_the_pessimistic_unclipped_branch():
    # A = 0.5 > 0 with ρ = e^−0.5 = 0.6065 < 0.8: min(ρA = 0.3033, 0.8·0.5 = 0.4) is the unclipped
    # ρA, so the gradient −ρA = −0.3032653299 still flows. Likewise A = −0.5 with ρ = e^0.5 > 1.2:
    # min(−0.8244, −0.6) = ρA, gradient −ρA = 0.8243606354.
    logp = torch.tensor([[-1.5, -0.5]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-1.0, -1.0]], dtype=torch.float64)
    teacher = torch.tensor([[-0.5, -1.5]], dtype=torch.float64)
    loss = sampled_token_opd(logp, old, teacher, torch.ones(1, 2, dtype=torch.bool), clip_eps=0.2)
    expected = torch.tensor([[-0.3032653298563167, 0.8243606353500641]], dtype=torch.float64)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("clip_eps", [None, 0.2])
def test_sampled_token_opd_first_use_gradient_is_reverse_kl_score_function(clip_eps):
    # First use: π_old = π_θ, so ρ = 1 and ∇ℓ_t = (log π_θ − log π_T)·∇log π_θ.
    logp = torch.tensor([[-1.0, -2.0, -0.7], [-3.0, -0.2, -0.9]], dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([[-0.5, -2.5, -0.7], [-1.0, -0.4, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    sampled_token_opd(logp, logp.detach(), teacher, mask, clip_eps=clip_eps).sum().backward()
    # logp − teacher, by hand: [−0.5, 0.5, 0.0], [−2.0, 0.2, 0 (padding)]
    expected = torch.tensor([[-0.5, 0.5, 0.0], [-2.0, 0.2, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(logp.grad, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("clip_eps", [None, 0.2, (0.1, 0.3)])
def test_sampled_token_opd_gradcheck(clip_eps):
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(2, 4, generator=g, dtype=torch.float64) * 3
    # Ratios e^±0.35 and e^±0.05: each away from the clip kinks at 0.8 / 0.9 / 1.2 / 1.3.
    offsets = torch.tensor([[0.35, -0.35, 0.05, -0.05], [0.05, 0.35, -0.35, -0.05]], dtype=torch.float64)
    logp = (old + offsets).requires_grad_()
    teacher = -torch.rand(2, 4, generator=g, dtype=torch.float64) * 3
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    assert torch.autograd.gradcheck(lambda x: sampled_token_opd(x, old, teacher, mask, clip_eps), (logp,))


def test_sampled_token_opd_old_and_teacher_are_stop_gradient():
    logp, old, teacher, mask = opd_inputs()
    old = old.nan_to_num(0.0).requires_grad_()
    teacher = teacher.nan_to_num(0.0, posinf=0.0).requires_grad_()
    sampled_token_opd(logp, old, teacher, mask).sum().backward()
    assert old.grad is None and teacher.grad is None


def one_position_per_token(theta: torch.Tensor, old_logits: torch.Tensor, teacher_logits: torch.Tensor):
    """One response position after a fixed prefix, every vocabulary token v as the sampled token:
    row v is y_t = v. Returns sampled_token_opd's [V, 1] inputs: log π_θ(v | prefix) (carrying the
    gradient to the logits θ), log π_old(v), log π_T(v) and the mask."""
    logp = F.log_softmax(theta, -1)[:, None]
    old = F.log_softmax(old_logits, -1)[:, None]
    teacher = F.log_softmax(teacher_logits, -1)[:, None]
    mask = torch.ones_like(logp, dtype=torch.bool)
    return logp, old, teacher, mask


@pytest.mark.parametrize("clip_eps", [None, 0.2])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_token_opd_expected_gradient_is_the_per_position_reverse_kl_gradient(seed, clip_eps):
    """At reuse 1 (π_old = π_θ, ρ = 1) the sampled-token loss is an unbiased estimate of the
    reverse-KL gradient at its position: Σ_v π_θ(v) ∇_θ ℓ(v) = ∇_θ KL(π_θ(·|prefix) ‖ π_T(·|prefix)),
    with θ the logits at that position. The advantage is per token (no return-to-go), so the
    estimator targets the per-position reverse KL, not the sequence KL. Exact in float64."""
    g = torch.Generator().manual_seed(seed)
    vocab = 13
    theta = (torch.randn(vocab, generator=g, dtype=torch.float64) * 2).requires_grad_()
    teacher_logits = torch.randn(vocab, generator=g, dtype=torch.float64) * 2
    logp, old, teacher, mask = one_position_per_token(theta, theta.detach(), teacher_logits)  # old = sg(logp)
    loss = sampled_token_opd(logp, old, teacher, mask, clip_eps=clip_eps)  # [V, 1]
    (expected_gradient,) = torch.autograd.grad((old.exp() * loss).sum(), theta)

    p, log_p, log_t = F.softmax(theta, -1), F.log_softmax(theta, -1), F.log_softmax(teacher_logits, -1)
    (kl_gradient,) = torch.autograd.grad((p * (log_p - log_t)).sum(), theta)
    torch.testing.assert_close(expected_gradient, kl_gradient, rtol=0, atol=1e-12)
    # By hand: ∂KL/∂θ_v = π_θ(v)·(log π_θ(v) − log π_T(v) − KL).
    with torch.no_grad():
        kl = (p * (log_p - log_t)).sum()
        torch.testing.assert_close(kl_gradient, p * (log_p - log_t - kl), rtol=0, atol=1e-12)
    assert kl_gradient.abs().max() > 1e-3  # not a vacuous 0 == 0


def test_sampled_token_opd_on_a_reused_rollout_misses_the_reverse_kl_gradient_by_the_drift():
    """On a reused rollout (π_old ≠ π_θ, no clip) the importance-weighted expectation over the
    behaviour policy is Σ_v π_old(v) ∇ℓ(v) = Σ_v π_θ(v)·(log π_old(v) − log π_T(v))·∇log π_θ(v):
    the advantage is frozen at π_old, so it falls short of ∇KL(π_θ ‖ π_T) by
    Σ_v π_θ(v)·d(v)·∇log π_θ(v), d = log π_θ − log π_old the drift the gates measure."""
    g = torch.Generator().manual_seed(3)
    vocab = 13
    old_logits = torch.randn(vocab, generator=g, dtype=torch.float64) * 2
    theta = (old_logits + 0.3 * torch.randn(vocab, generator=g, dtype=torch.float64)).requires_grad_()
    teacher_logits = torch.randn(vocab, generator=g, dtype=torch.float64) * 2
    logp, old, teacher, mask = one_position_per_token(theta, old_logits, teacher_logits)
    loss = sampled_token_opd(logp, old, teacher, mask)
    (expected_gradient,) = torch.autograd.grad((old.exp() * loss).sum(), theta)

    p, log_p, log_t = F.softmax(theta, -1), F.log_softmax(theta, -1), F.log_softmax(teacher_logits, -1)
    (kl_gradient,) = torch.autograd.grad((p * (log_p - log_t)).sum(), theta)
    drift = (log_p - F.log_softmax(old_logits, -1)).detach()
    (drift_term,) = torch.autograd.grad((p.detach() * drift * F.log_softmax(theta, -1)).sum(), theta)
    torch.testing.assert_close(expected_gradient, kl_gradient - drift_term, rtol=0, atol=1e-12)
    assert drift_term.abs().max() > 1e-3


# ---------------------------------------------------------------- topk_lsm

# Support of K = 2 tokens at one position. Full-vocabulary probabilities:
#   student [0.5, 0.25] (mass 0.75), teacher [0.2, 0.6] (mass 0.8).
# Renormalised: p̂_S = [2/3, 1/3], p̂_T = [1/4, 3/4].
# Tail bucket:  S = [0.5, 0.25, 0.25], T = [0.2, 0.6, 0.2].
TOPK_STUDENT = [[[0.5, 0.25]]]
TOPK_TEACHER = [[[0.2, 0.6]]]
TOPK_EXPECTED = {
    # 2/3·ln(8/3) + 1/3·ln(4/9)
    ("reverse_kl", False): 0.38357609660237457,
    # 1/4·ln(3/8) + 3/4·ln(9/4)
    ("forward_kl", False): 0.36299034890931503,
    # M = [11/24, 13/24]: ½[1/4·ln(6/11) + 3/4·ln(18/13)] + ½[2/3·ln(16/11) + 1/3·ln(8/13)]
    ("jsd", False): 0.09024627190021622,
    # 0.5·ln(2.5) + 0.25·ln(0.25/0.6) + 0.25·ln(1.25)
    ("reverse_kl", True): 0.295064069427155,
    # 0.2·ln(0.4) + 0.6·ln(2.4) + 0.2·ln(0.8)
    ("forward_kl", True): 0.2973943857746669,
    # M = [0.35, 0.425, 0.225]: ½·KL(T ‖ M) + ½·KL(S ‖ M)
    ("jsd", True): 0.07172253258747838,
}


@pytest.mark.parametrize("divergence,tail", list(TOPK_EXPECTED))
def test_topk_lsm_hand_values(divergence, tail):
    mask = torch.ones(1, 1, dtype=torch.bool)
    loss = topk_lsm(as_logp(TOPK_STUDENT), as_logp(TOPK_TEACHER), mask, divergence=divergence, tail=tail)
    assert loss.shape == (1, 1)
    assert loss.item() == pytest.approx(TOPK_EXPECTED[divergence, tail], abs=1e-12)


def test_topk_lsm_jsd_beta_end_points_and_interior():
    student, teacher, mask = as_logp(TOPK_STUDENT), as_logp(TOPK_TEACHER), torch.ones(1, 1, dtype=torch.bool)
    # β = 0 is forward KL(p̂_T ‖ p̂_S), β = 1 is reverse KL(p̂_S ‖ p̂_T) (GKD convention).
    assert topk_lsm(student, teacher, mask, "jsd", beta=0.0).item() == pytest.approx(0.36299034890931503, abs=1e-12)
    assert topk_lsm(student, teacher, mask, "jsd", beta=1.0).item() == pytest.approx(0.38357609660237457, abs=1e-12)
    # β = 0.3: M = 0.3·[1/4, 3/4] + 0.7·[2/3, 1/3] = [0.5417, 0.4583]; 0.3·KL(T ‖ M) + 0.7·KL(S ‖ M)
    assert topk_lsm(student, teacher, mask, "jsd", beta=0.3).item() == pytest.approx(0.07541046716501534, abs=1e-12)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_topk_lsm_tail_equals_renormalised_when_support_holds_all_mass(divergence):
    g = torch.Generator().manual_seed(1)
    student = torch.log_softmax(torch.randn(2, 3, 5, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    teacher = torch.log_softmax(torch.randn(2, 3, 5, generator=g, dtype=torch.float64), dim=-1)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with_tail = topk_lsm(student, teacher, mask, divergence, tail=True)
    renormalised = topk_lsm(student, teacher, mask, divergence, tail=False)
    torch.testing.assert_close(with_tail, renormalised, rtol=0, atol=1e-12)
    # At full mass log(1 − Σp) sits on its floor: the gradient must stay finite, not NaN.
    with_tail.sum().backward()
    assert torch.isfinite(student.grad).all()


def test_topk_lsm_tail_gradient_finite_when_float32_support_mass_rounds_above_one():
    student = torch.log_softmax(torch.tensor([[[4.0, 3.0, 2.0]]]), dim=-1)
    student = (student + 1e-6).requires_grad_()  # Σ_K p = 1.000001 after rounding
    teacher = torch.log(torch.tensor([[[0.5, 0.3, 0.1]]]))
    loss = topk_lsm(student, teacher, torch.ones(1, 1, dtype=torch.bool), "reverse_kl", tail=True)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(student.grad).all()


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("tail", [False, True])
def test_topk_lsm_gradcheck(divergence, tail):
    g = torch.Generator().manual_seed(2)
    # Log-probs of K = 4 tokens out of a vocabulary of 7, so Σ_K p < 1 (the tail bucket is non-empty).
    student = torch.log_softmax(torch.randn(2, 3, 7, generator=g, dtype=torch.float64), dim=-1)[..., :4]
    teacher = torch.log_softmax(torch.randn(2, 3, 7, generator=g, dtype=torch.float64), dim=-1)[..., :4]
    mask = torch.tensor([[True, True, False], [True, True, True]])
    student = student.detach().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: topk_lsm(x, teacher, mask, divergence, tail=tail, beta=0.3), (student,)
    )


def test_topk_lsm_reverse_kl_gradient_by_hand():
    # Renormalised reverse KL: ∂KL(p̂_S ‖ p̂_T)/∂s_k = p̂_S,k·(log p̂_S,k − log p̂_T,k − KL).
    # With p̂_S = [2/3, 1/3], p̂_T = [1/4, 3/4], KL = 0.3835760966:
    #   k=0: 2/3·(ln(8/3) − 0.3835760966) = 2/3·0.5972531564 = 0.3981687709
    #   k=1: 1/3·(ln(4/9) − 0.3835760966) = 1/3·(−1.1945063128) = −0.3981687709
    student = as_logp(TOPK_STUDENT).requires_grad_()
    topk_lsm(student, as_logp(TOPK_TEACHER), torch.ones(1, 1, dtype=torch.bool)).sum().backward()
    expected = torch.tensor([[[0.3981687709, -0.3981687709]]], dtype=torch.float64)
    torch.testing.assert_close(student.grad, expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("tail", [False, True])
def test_topk_lsm_padding_changes_nothing(divergence, tail):
    g = torch.Generator().manual_seed(3)
    student = torch.log_softmax(torch.randn(2, 3, 6, generator=g, dtype=torch.float64), dim=-1)[..., :4]
    teacher = torch.log_softmax(torch.randn(2, 3, 6, generator=g, dtype=torch.float64), dim=-1)[..., :4]
    mask = torch.ones(2, 3, dtype=torch.bool)
    # Two padded positions per row and a fully padded row, all holding garbage.
    garbage = torch.tensor([NAN, INF, -INF, 1e30], dtype=torch.float64).expand(3, 5, 4)
    padded_student = garbage.clone()
    padded_student[:2, :3] = student
    padded_teacher = garbage.clone().flip(-1)
    padded_teacher[:2, :3] = teacher
    padded_mask = torch.zeros(3, 5, dtype=torch.bool)
    padded_mask[:2, :3] = True

    student.requires_grad_()
    padded_student.requires_grad_()
    loss = gated_reduce(topk_lsm(student, teacher, mask, divergence, tail), [], mask)
    padded_loss = gated_reduce(topk_lsm(padded_student, padded_teacher, padded_mask, divergence, tail), [], padded_mask)
    loss.backward()
    padded_loss.backward()
    torch.testing.assert_close(padded_loss, loss, rtol=0, atol=1e-12)
    torch.testing.assert_close(padded_student.grad[:2, :3], student.grad, rtol=0, atol=1e-12)
    assert (padded_student.grad[~padded_mask] == 0).all()


def test_topk_lsm_teacher_is_stop_gradient():
    student = as_logp(TOPK_STUDENT).requires_grad_()
    teacher = as_logp(TOPK_TEACHER).requires_grad_()
    topk_lsm(student, teacher, torch.ones(1, 1, dtype=torch.bool)).sum().backward()
    assert teacher.grad is None and student.grad is not None


@st.composite
def support_logprobs(draw):
    """Valid [B, T, K] log-probs of K tokens of a vocabulary of V ≥ K (so Σ_K p ≤ 1)."""
    B, T, K = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 5))
    V = K + draw(st.integers(0, 3))
    scale = draw(st.floats(0.1, 10.0))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    student = torch.log_softmax(scale * torch.randn(B, T, V, generator=g, dtype=torch.float64), -1)[..., :K]
    teacher = torch.log_softmax(scale * torch.randn(B, T, V, generator=g, dtype=torch.float64), -1)[..., :K]
    mask = torch.rand(B, T, generator=g) < 0.8
    return student, teacher, mask


@settings(max_examples=60, deadline=None)
@given(support_logprobs(), st.sampled_from(DIVERGENCES), st.booleans(), st.floats(0.0, 1.0))
def test_topk_lsm_is_a_divergence(inputs, divergence, tail, beta):
    student, teacher, mask = inputs
    loss = topk_lsm(student, teacher, mask, divergence, tail=tail, beta=beta)
    assert torch.isfinite(loss).all()
    assert (loss >= -1e-12).all()
    assert (loss[~mask] == 0).all()
    # A distribution is at divergence 0 from itself.
    self_loss = topk_lsm(student, student, mask, divergence, tail=tail, beta=beta)
    torch.testing.assert_close(self_loss, torch.zeros_like(self_loss), rtol=0, atol=1e-12)


# ---------------------------------------------------------------- generalized_jsd

# V = 2. Student logits [0, ln 3] → S = [1/4, 3/4]; teacher logits [ln 2, 0] → T = [2/3, 1/3].
GJSD_EXPECTED = {
    0.0: 0.38357609660237457,  # KL(T ‖ S) = 2/3·ln(8/3) + 1/3·ln(4/9)
    1.0: 0.36299034890931503,  # KL(S ‖ T) = 1/4·ln(3/8) + 3/4·ln(9/4)
    0.5: 0.09024627190021622,  # M = [11/24, 13/24]; ½·KL(T ‖ M) + ½·KL(S ‖ M)
    0.3: 0.07697438643637244,  # M = 0.3·T + 0.7·S = [0.375, 0.625]; 0.3·KL(T ‖ M) + 0.7·KL(S ‖ M)
}


@pytest.mark.parametrize("beta", list(GJSD_EXPECTED))
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_generalized_jsd_hand_values(beta, temperature):
    # Logits are multiplied by τ so that logits / τ give the same S and T at every temperature.
    student = temperature * torch.tensor([[[0.0, math.log(3.0)]]], dtype=torch.float64)
    teacher = temperature * torch.tensor([[[math.log(2.0), 0.0]]], dtype=torch.float64)
    loss = generalized_jsd(student, teacher, torch.ones(1, 1, dtype=torch.bool), beta=beta, temperature=temperature)
    assert loss.item() == pytest.approx(GJSD_EXPECTED[beta], abs=1e-12)


def trl_generalized_jsd_per_token(student_logits, teacher_logits, beta, temperature):
    """TRL GKDTrainer.generalized_jsd_loss before its reduction, summed over the vocabulary,
    written out independently (TRL is not a dependency): F.kl_div(input, target, log_target=True)
    is Σ exp(target)·(target − input) = KL(target ‖ input)."""
    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    else:
        beta_t = torch.tensor(beta, dtype=student_log_probs.dtype)
        mixture_log_probs = torch.logsumexp(
            torch.stack([student_log_probs + torch.log(1 - beta_t), teacher_log_probs + torch.log(beta_t)]), dim=0
        )
        kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none", log_target=True)
        kl_student = F.kl_div(mixture_log_probs, student_log_probs, reduction="none", log_target=True)
        jsd = beta_t * kl_teacher + (1 - beta_t) * kl_student
    return jsd.sum(dim=-1)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_generalized_jsd_matches_trl_formula(beta, temperature):
    g = torch.Generator().manual_seed(4)
    student = 3 * torch.randn(3, 5, 11, generator=g, dtype=torch.float64)
    teacher = 3 * torch.randn(3, 5, 11, generator=g, dtype=torch.float64)
    mask = torch.ones(3, 5, dtype=torch.bool)
    ours = generalized_jsd(student, teacher, mask, beta=beta, temperature=temperature)
    trl = trl_generalized_jsd_per_token(student, teacher, beta, temperature)
    torch.testing.assert_close(ours, trl, rtol=1e-10, atol=1e-12)


def test_generalized_jsd_float32_matches_trl_formula():
    g = torch.Generator().manual_seed(5)
    student, teacher = torch.randn(2, 4, 64, generator=g), torch.randn(2, 4, 64, generator=g)
    ours = generalized_jsd(student, teacher, torch.ones(2, 4, dtype=torch.bool), beta=0.5)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, trl_generalized_jsd_per_token(student, teacher, 0.5, 1.0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_generalized_jsd_gradcheck(beta, temperature):
    g = torch.Generator().manual_seed(6)
    student = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    mask = torch.tensor([[True, False, True], [True, True, True]])
    assert torch.autograd.gradcheck(lambda x: generalized_jsd(x, teacher, mask, beta, temperature), (student,))


def test_generalized_jsd_padding_changes_nothing():
    g = torch.Generator().manual_seed(7)
    student = torch.randn(2, 3, 6, generator=g, dtype=torch.float64)
    teacher = torch.randn(2, 3, 6, generator=g, dtype=torch.float64)
    mask = torch.ones(2, 3, dtype=torch.bool)
    padded_student = torch.full((3, 4, 6), NAN, dtype=torch.float64)
    padded_student[:2, :3] = student
    padded_teacher = torch.full((3, 4, 6), INF, dtype=torch.float64)
    padded_teacher[:2, :3] = teacher
    padded_mask = torch.zeros(3, 4, dtype=torch.bool)
    padded_mask[:2, :3] = True
    student.requires_grad_()
    padded_student.requires_grad_()
    loss = gated_reduce(generalized_jsd(student, teacher, mask), [], mask)
    padded_loss = gated_reduce(generalized_jsd(padded_student, padded_teacher, padded_mask), [], padded_mask)
    loss.backward()
    padded_loss.backward()
    torch.testing.assert_close(padded_loss, loss, rtol=0, atol=1e-12)
    torch.testing.assert_close(padded_student.grad[:2, :3], student.grad, rtol=0, atol=1e-12)
    assert (padded_student.grad[~padded_mask] == 0).all()


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.0, 1.0), st.floats(0.25, 4.0), st.floats(0.1, 20.0))
def test_generalized_jsd_is_nonnegative_and_zero_on_equal_inputs(seed, beta, temperature, scale):
    g = torch.Generator().manual_seed(seed)
    student = scale * torch.randn(2, 3, 9, generator=g, dtype=torch.float64)
    teacher = scale * torch.randn(2, 3, 9, generator=g, dtype=torch.float64)
    mask = torch.ones(2, 3, dtype=torch.bool)
    assert (generalized_jsd(student, teacher, mask, beta, temperature) >= -1e-12).all()
    same = generalized_jsd(student, student, mask, beta, temperature)
    torch.testing.assert_close(same, torch.zeros_like(same), rtol=0, atol=1e-12)


# ---------------------------------------------------------------- gated_reduce

REDUCE_LOSS = [[1.0, 2.0, 3.0], [4.0, 5.0, NAN]]
REDUCE_GATE = [[1.0, 0.5, 2.0], [1.0, 1.0, INF]]
REDUCE_MASK = [[True, True, True], [True, True, False]]


def reduce_inputs():
    loss = torch.tensor(REDUCE_LOSS, dtype=torch.float64, requires_grad=True)
    return loss, torch.tensor(REDUCE_GATE, dtype=torch.float64), torch.tensor(REDUCE_MASK)


def test_gated_reduce_token_mean_hand_value():
    loss, gate, mask = reduce_inputs()
    # Σ g·m·ℓ = 1·1 + 0.5·2 + 2·3 + 1·4 + 1·5 = 17 over Σ m = 5 → 3.4
    out = gated_reduce(loss, [gate], mask)
    assert out.item() == pytest.approx(3.4, abs=1e-12)
    out.backward()
    # ∂/∂ℓ_t = g_t·m_t / 5; the padded slot (ℓ = NaN, g = inf) gets exactly 0.
    expected = torch.tensor([[0.2, 0.1, 0.4], [0.2, 0.2, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(loss.grad, expected, rtol=0, atol=1e-12)


def test_gated_reduce_composes_gates_by_product():
    loss, gate, mask = reduce_inputs()
    second = torch.tensor([[2.0, 2.0, 0.0], [0.5, 0.0, 3.0]], dtype=torch.float64)
    # g = [1·2, 0.5·2, 2·0], [1·0.5, 1·0]: Σ g·ℓ = 2 + 2 + 0 + 2 + 0 = 6 over 5 → 1.2
    assert gated_reduce(loss, [gate, second], mask).item() == pytest.approx(1.2, abs=1e-12)


def test_gated_reduce_sequence_mean_hand_value():
    loss, gate, mask = reduce_inputs()
    # row 0: (1 + 1 + 6) / 3 = 8/3; row 1: (4 + 5) / 2 = 4.5; mean of the rows = 3.5833333333
    out = gated_reduce(loss, [gate], mask, reduction="sequence_mean")
    assert out.item() == pytest.approx(3.583333333333333, abs=1e-12)


def test_gated_reduce_sequence_mean_skips_empty_rows():
    loss, gate, mask = reduce_inputs()
    loss3 = torch.cat([loss.detach(), torch.tensor([[7.0, 7.0, 7.0]], dtype=torch.float64)])
    gate3 = torch.cat([gate, torch.ones(1, 3, dtype=torch.float64)])
    mask3 = torch.cat([mask, torch.zeros(1, 3, dtype=torch.bool)])
    out = gated_reduce(loss3, [gate3], mask3, reduction="sequence_mean")
    assert out.item() == pytest.approx(3.583333333333333, abs=1e-12)


def test_gated_reduce_normalizer_override():
    loss, gate, mask = reduce_inputs()
    # The global token count of the optimiser step replaces the local 5: 17 / 20 = 0.85
    assert gated_reduce(loss, [gate], mask, normalizer=20).item() == pytest.approx(0.85, abs=1e-12)
    # sequence_mean: (8/3 + 4.5) / 4 global rows = 1.7916666667
    out = gated_reduce(loss, [gate], mask, reduction="sequence_mean", normalizer=torch.tensor(4.0))
    assert out.item() == pytest.approx(1.7916666666666667, abs=1e-12)
    # A micro-batch with no valid token contributes 0 under a global normalizer.
    empty = torch.zeros(2, 3, dtype=torch.bool)
    assert gated_reduce(loss, [gate], empty, normalizer=20).item() == 0.0


def test_gated_reduce_micro_batches_with_global_normalizer_equal_the_full_batch():
    g = torch.Generator().manual_seed(8)
    loss = torch.randn(4, 6, generator=g, dtype=torch.float64)
    gate = torch.rand(4, 6, generator=g, dtype=torch.float64)
    mask = torch.rand(4, 6, generator=g) < 0.7
    mask[:, 0] = True
    full = gated_reduce(loss, [gate], mask)
    total = mask.sum()
    halves = sum(gated_reduce(loss[i : i + 2], [gate[i : i + 2]], mask[i : i + 2], normalizer=total) for i in (0, 2))
    torch.testing.assert_close(halves, full, rtol=0, atol=1e-12)


def test_gated_reduce_gates_receive_no_gradient():
    loss, _, mask = reduce_inputs()
    gate = torch.tensor([[1.0, 0.5, 2.0], [1.0, 1.0, 1.0]], dtype=torch.float64, requires_grad=True)
    gated_reduce(loss, [gate], mask).backward()
    assert gate.grad is None
    assert loss.grad is not None


@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean"])
def test_gated_reduce_padding_rows_and_columns_change_nothing(reduction):
    g = torch.Generator().manual_seed(9)
    loss = torch.randn(2, 4, generator=g, dtype=torch.float64)
    gate = torch.rand(2, 4, generator=g, dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    padded_loss = torch.full((3, 7), NAN, dtype=torch.float64)
    padded_loss[:2, :4] = loss
    padded_gate = torch.full((3, 7), INF, dtype=torch.float64)
    padded_gate[:2, :4] = gate
    padded_mask = torch.zeros(3, 7, dtype=torch.bool)
    padded_mask[:2, :4] = mask
    loss.requires_grad_()
    padded_loss.requires_grad_()
    out = gated_reduce(loss, [gate], mask, reduction)
    padded_out = gated_reduce(padded_loss, [padded_gate], padded_mask, reduction)
    out.backward()
    padded_out.backward()
    torch.testing.assert_close(padded_out, out, rtol=0, atol=1e-12)
    torch.testing.assert_close(padded_loss.grad[:2, :4], loss.grad, rtol=0, atol=1e-12)
    assert (padded_loss.grad[~padded_mask] == 0).all()


@pytest.mark.parametrize("clip_eps", [None, 0.2])
def test_sampled_token_opd_padding_changes_nothing(clip_eps):
    logp, old, teacher, mask = opd_inputs()
    # Two more padded positions per row and a fully padded row, holding garbage.
    padded = [torch.full((3, 5), fill, dtype=torch.float64) for fill in (50.0, NAN, -INF)]
    for big, small in zip(padded, (logp.detach(), old, teacher)):
        big[:2, :3] = small
    padded_mask = torch.zeros(3, 5, dtype=torch.bool)
    padded_mask[:2, :3] = mask
    padded[0].requires_grad_()
    out = gated_reduce(sampled_token_opd(logp, old, teacher, mask, clip_eps), [], mask)
    padded_out = gated_reduce(sampled_token_opd(*padded, padded_mask, clip_eps), [], padded_mask)
    out.backward()
    padded_out.backward()
    torch.testing.assert_close(padded_out, out, rtol=0, atol=1e-12)
    torch.testing.assert_close(padded[0].grad[:2, :3], logp.grad, rtol=0, atol=1e-12)
    assert (padded[0].grad[~padded_mask] == 0).all()


# ---------------------------------------------------------------- bad input


def test_bad_input_raises_value_error():
    logp, old, teacher, mask = opd_inputs(requires_grad=False)
    with pytest.raises(ValueError, match="bool"):
        sampled_token_opd(logp, old, teacher, mask.long())
    with pytest.raises(ValueError, match="old_logp"):
        sampled_token_opd(logp, old[:, :2], teacher, mask)
    with pytest.raises(ValueError, match="non-finite"):
        sampled_token_opd(logp, old, teacher, torch.ones(2, 3, dtype=torch.bool))  # NaN at a valid position
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        sampled_token_opd(logp[0], old[0], teacher[0], mask[0])

    student, target = as_logp(TOPK_STUDENT), as_logp(TOPK_TEACHER)
    one = torch.ones(1, 1, dtype=torch.bool)
    with pytest.raises(ValueError, match="teacher_logp"):
        topk_lsm(student, target[..., :1], one)
    with pytest.raises(ValueError, match="mask"):
        topk_lsm(student, target, torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\[B, T, K\]"):
        topk_lsm(student[0], target[0], one)
    with pytest.raises(ValueError, match="divergence"):
        topk_lsm(student, target, one, divergence="kl")
    with pytest.raises(ValueError, match="non-finite"):
        topk_lsm(torch.tensor([[[NAN, -1.0]]]), target.float(), one)
    with pytest.raises(ValueError, match="beta"):
        topk_lsm(student, target, one, divergence="jsd", beta=1.5)

    logits = torch.zeros(1, 1, 3)
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(logits, logits, one, beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        generalized_jsd(logits, logits, one, temperature=0.0)
    with pytest.raises(ValueError, match="teacher_logits"):
        generalized_jsd(logits, torch.zeros(1, 1, 4), one)
    with pytest.raises(ValueError, match="non-finite"):
        generalized_jsd(torch.tensor([[[0.0, INF, 1.0]]]), logits, one)

    loss, gate, rmask = reduce_inputs()
    with pytest.raises(ValueError, match="selects no position"):
        gated_reduce(loss, [gate], torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="gate"):
        gated_reduce(loss, [gate[:, :2]], rmask)
    with pytest.raises(ValueError, match="reduction"):
        gated_reduce(loss, [gate], rmask, reduction="sum")
    with pytest.raises(ValueError, match="bool"):
        gated_reduce(loss, [gate], rmask.float())


def test_teacher_rows_weight_is_bounded_on_the_worked_example():
    """A teacher token the student gives 1e-4 and the teacher 0.9: A = log 0.9 − log 1e-4 ≈ 9.1.
    After a second epoch's drift (ρ = 30) the unbounded gradient weight ρ·A is ≈ 273; bounded
    with c = 1, ε = 0.2 it is clip(ρ)·clip(A) = 1.2 (a typical student token: A ≈ 0.29)."""
    from lit_opd.losses import bounded_sampled_token_opd

    old = torch.tensor([[math.log(1e-4), math.log(0.5)]], dtype=torch.float64)
    teacher = torch.tensor([[math.log(0.9), math.log(0.5) - 3.0]], dtype=torch.float64)
    logp = (old + torch.tensor([[math.log(30.0), math.log(0.5)]], dtype=torch.float64)).requires_grad_()
    mask = torch.ones(1, 2, dtype=torch.bool)
    unbounded = sampled_token_opd(logp, old, teacher, mask)
    (grad_unbounded,) = torch.autograd.grad(unbounded.sum(), logp)
    assert grad_unbounded[0, 0].item() == pytest.approx(-30.0 * (math.log(0.9) - math.log(1e-4)))
    bounded = bounded_sampled_token_opd(logp, old, teacher, mask, advantage_clip=1.0, ratio_clip=0.2)
    (grad,) = torch.autograd.grad(bounded.sum(), logp)
    # token 0: A = 9.1 → 1, ρ = 30 → 1.2; token 1: A = −3 → −1, ρ = 0.5 → 0.8
    torch.testing.assert_close(grad, torch.tensor([[-1.2, 0.8]], dtype=torch.float64))
    torch.testing.assert_close(bounded.detach(), torch.tensor([[-1.2, 0.8]], dtype=torch.float64))
    assert grad.abs().max() <= 1.2 + 1e-12


def test_bounded_loss_is_zero_off_the_mask_and_within_bounds_for_any_input():
    from lit_opd.losses import bounded_sampled_token_opd

    generator = torch.Generator().manual_seed(0)
    logp = (torch.randn(4, 6, generator=generator, dtype=torch.float64) * 5).requires_grad_()
    old, teacher = (torch.randn(4, 6, generator=generator, dtype=torch.float64) * 5 for _ in range(2))
    mask = torch.rand(4, 6, generator=generator) > 0.3
    loss = bounded_sampled_token_opd(logp, old, teacher, mask, advantage_clip=2.0, ratio_clip=0.1)
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    assert (loss[~mask] == 0).all() and (grad[~mask] == 0).all()
    assert grad.abs().max() <= 1.1 * 2.0 + 1e-12


def test_sign_gated_topk_target_hand_values():
    """K = 2, p̂_θ = (0.6, 0.4), p̂_T = (0.2, 0.8), λ = 1.5 (agree: extrapolate) and 0.5 (disagree):
    p* ∝ p̂_θ^(1−λ) · p̂_T^λ; reverse KL(p̂_θ ‖ p*)."""
    student = torch.log(torch.tensor([[[0.6, 0.4], [0.6, 0.4]]], dtype=torch.float64))
    teacher = torch.log(torch.tensor([[[0.2, 0.8], [0.2, 0.8]]], dtype=torch.float64))
    mask = torch.ones(1, 2, dtype=torch.bool)
    lam = torch.tensor([[1.5, 0.5]], dtype=torch.float64)
    expected = []
    for value in (1.5, 0.5):
        weights = [0.6 ** (1 - value) * 0.2**value, 0.4 ** (1 - value) * 0.8**value]
        target = [w / sum(weights) for w in weights]
        expected.append(0.6 * math.log(0.6 / target[0]) + 0.4 * math.log(0.4 / target[1]))
    loss = topk_lsm(student, teacher, mask, "reverse_kl", target_mix=lam)
    torch.testing.assert_close(loss, torch.tensor([expected], dtype=torch.float64))
    plain = topk_lsm(student, teacher, mask, "reverse_kl")
    torch.testing.assert_close(topk_lsm(student, teacher, mask, "reverse_kl", target_mix=torch.ones(1, 2)), plain)


def test_sign_gated_topk_target_is_detached_from_the_student():
    """The target's student part is sg(log p̂_θ): the gradient is that of KL(p̂_θ ‖ p*) with p* fixed."""
    student = torch.log(torch.tensor([[[0.6, 0.4]]], dtype=torch.float64)).requires_grad_()
    teacher = torch.log(torch.tensor([[[0.2, 0.8]]], dtype=torch.float64))
    mask = torch.ones(1, 1, dtype=torch.bool)
    loss = topk_lsm(student, teacher, mask, "forward_kl", target_mix=torch.tensor([[1.5]], dtype=torch.float64))
    (grad,) = torch.autograd.grad(loss.sum(), student)
    weights = torch.tensor([0.6**-0.5 * 0.2**1.5, 0.4**-0.5 * 0.8**1.5], dtype=torch.float64)
    target = torch.log(weights / weights.sum()).view(1, 1, 2)
    fixed = student.detach().clone().requires_grad_()
    (expected,) = torch.autograd.grad(topk_lsm(fixed, target, mask, "forward_kl").sum(), fixed)
    torch.testing.assert_close(grad, expected)


def test_truncated_importance_weight_hand_values():
    """w = min(exp(log π_old − log π_rollout), C), 0 off the mask, whatever the padding holds."""
    old = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, float("nan"), 0.0]])
    rollout = torch.tensor([[-1.5, -1.0, -0.5], [-1.0, 0.0, float("inf")]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    weight = truncated_importance_weight(old, rollout, mask, cap=1.5)
    expected = torch.tensor([[1.5, math.exp(-1.0), 1.0], [math.exp(-2.0), 0.0, 0.0]])
    torch.testing.assert_close(weight, expected)
    logp = torch.zeros(2, 3, requires_grad=True)
    assert not truncated_importance_weight(logp, rollout.nan_to_num(), mask, cap=2.0).requires_grad
