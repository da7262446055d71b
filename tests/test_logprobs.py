"""Chunked log-probs from hidden states: values, gradients against the naive [N, V] computation,
and a deterministic memory check (what autograd saves for backward never holds an [N, V] tensor)."""

import math

import pytest
import torch

from lit_opd.logprobs import chunked_generalized_jsd, support_logprobs, token_logprobs, topk_logprobs
from lit_opd.losses import generalized_jsd


def naive_log_softmax(hidden, weight):
    return torch.log_softmax((hidden @ weight.T).to(torch.promote_types(hidden.dtype, torch.float32)), dim=-1)


def random_head(B, T, H, V, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=dtype)
    weight = torch.randn(V, H, generator=g, dtype=dtype) / math.sqrt(H)
    return hidden, weight, g


def test_hand_values():
    # H = 1, weight rows [1, 0, −1], hidden ln 2 → logits [ln 2, 0, −ln 2] → exp [2, 1, 1/2], Σ = 7/2
    # log π = [ln(4/7), ln(2/7), ln(1/7)] = [−0.5596157879, −1.2527629685, −1.9459101491]
    hidden = torch.tensor([[[math.log(2.0)]]], dtype=torch.float64)
    weight = torch.tensor([[1.0], [0.0], [-1.0]], dtype=torch.float64)
    support = torch.tensor([[[2, 0, 1]]])
    expected = torch.tensor([[[-1.9459101490553135, -0.5596157879354228, -1.252762968495368]]], dtype=torch.float64)
    torch.testing.assert_close(support_logprobs(hidden, weight, support), expected, rtol=0, atol=1e-12)
    tokens = torch.tensor([[0]])
    torch.testing.assert_close(token_logprobs(hidden, weight, tokens), expected[..., 1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1024])
def test_values_equal_naive_for_any_chunking(chunk_size):
    hidden, weight, g = random_head(2, 5, 8, 50)
    tokens = torch.randint(0, 50, (2, 5), generator=g)
    support = torch.randint(0, 50, (2, 5, 4), generator=g)
    full = naive_log_softmax(hidden, weight)
    torch.testing.assert_close(
        token_logprobs(hidden, weight, tokens, chunk_size), full.gather(-1, tokens[..., None])[..., 0]
    )
    torch.testing.assert_close(support_logprobs(hidden, weight, support, chunk_size), full.gather(-1, support))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradient_equals_naive(dtype):
    hidden, weight, g = random_head(3, 4, 8, 40, dtype=dtype, seed=1)
    support = torch.randint(0, 40, (3, 4, 5), generator=g)
    support[0, 0] = torch.tensor([7, 7, 7, 2, 2])  # repeated ids must accumulate
    upstream = torch.randn(3, 4, 5, generator=g, dtype=dtype)

    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    (support_logprobs(h1, w1, support, chunk_size=5) * upstream).sum().backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    (naive_log_softmax(h2, w2).gather(-1, support) * upstream).sum().backward()

    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h1.grad, h2.grad, **tol)
    torch.testing.assert_close(w1.grad, w2.grad, **tol)


def test_gradcheck_support_logprobs():
    hidden, weight, g = random_head(1, 5, 3, 6, seed=2)
    support = torch.randint(0, 6, (1, 5, 3), generator=g)
    assert torch.autograd.gradcheck(
        lambda h, w: support_logprobs(h, w, support, chunk_size=2),
        (hidden.requires_grad_(), weight.requires_grad_()),
    )


def test_gradcheck_token_logprobs():
    hidden, weight, g = random_head(2, 3, 3, 6, seed=3)
    tokens = torch.randint(0, 6, (2, 3), generator=g)
    assert torch.autograd.gradcheck(
        lambda h, w: token_logprobs(h, w, tokens, chunk_size=4),
        (hidden.requires_grad_(), weight.requires_grad_()),
    )


def test_gradient_to_one_input_only():
    hidden, weight, g = random_head(2, 3, 4, 9, seed=4)
    tokens = torch.randint(0, 9, (2, 3), generator=g)
    h = hidden.clone().requires_grad_()
    token_logprobs(h, weight, tokens, chunk_size=2).sum().backward()
    h_ref = hidden.clone().requires_grad_()
    naive_log_softmax(h_ref, weight).gather(-1, tokens[..., None]).sum().backward()
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-12, atol=1e-12)
    w = weight.clone().requires_grad_()
    token_logprobs(hidden, w, tokens, chunk_size=2).sum().backward()
    w_ref = weight.clone().requires_grad_()
    naive_log_softmax(hidden, w_ref).gather(-1, tokens[..., None]).sum().backward()
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-12, atol=1e-12)


def test_bfloat16_hidden_gives_float32_logprobs():
    hidden, weight, g = random_head(2, 3, 16, 64, dtype=torch.bfloat16, seed=5)
    tokens = torch.randint(0, 64, (2, 3), generator=g)
    out = token_logprobs(hidden.requires_grad_(), weight, tokens, chunk_size=4)
    assert out.dtype == torch.float32
    reference = naive_log_softmax(hidden.detach(), weight).gather(-1, tokens[..., None])[..., 0]
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)
    out.sum().backward()
    assert hidden.grad.dtype == torch.bfloat16 and torch.isfinite(hidden.grad.float()).all()


def test_topk_logprobs_equal_naive_top_k():
    hidden, weight, _ = random_head(2, 5, 8, 30, seed=6)
    values, ids = topk_logprobs(hidden, weight, k=4, chunk_size=3)
    reference = torch.topk(naive_log_softmax(hidden, weight), 4, dim=-1)
    torch.testing.assert_close(values, reference.values, rtol=0, atol=1e-12)
    assert torch.equal(ids, reference.indices)
    assert (values.diff(dim=-1) <= 0).all()
    assert not values.requires_grad


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_generalized_jsd_equals_full_logits(beta, temperature):
    student_hidden, student_weight, g = random_head(2, 5, 6, 20, seed=7)
    teacher_hidden = torch.randn(2, 5, 9, generator=g, dtype=torch.float64)
    teacher_weight = torch.randn(20, 9, generator=g, dtype=torch.float64)
    chunked = chunked_generalized_jsd(
        student_hidden, student_weight, teacher_hidden, teacher_weight, beta, temperature, chunk_size=3
    )
    full = generalized_jsd(
        student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T, torch.ones(2, 5, dtype=torch.bool),
        beta, temperature,
    )
    torch.testing.assert_close(chunked, full, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gradcheck_chunked_generalized_jsd(beta):
    student_hidden, student_weight, g = random_head(1, 5, 3, 7, seed=8)
    teacher_hidden = torch.randn(1, 5, 4, generator=g, dtype=torch.float64)
    teacher_weight = torch.randn(7, 4, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda h, w: chunked_generalized_jsd(h, w, teacher_hidden, teacher_weight, beta, 2.0, chunk_size=2),
        (student_hidden.requires_grad_(), student_weight.requires_grad_()),
    )


def test_chunked_generalized_jsd_teacher_is_stop_gradient():
    student_hidden, student_weight, g = random_head(1, 3, 3, 7, seed=9)
    teacher_hidden = torch.randn(1, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    teacher_weight = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    student_hidden.requires_grad_()
    chunked_generalized_jsd(student_hidden, student_weight, teacher_hidden, teacher_weight).sum().backward()
    assert teacher_hidden.grad is None and teacher_weight.grad is None and student_hidden.grad is not None


def test_bad_input_raises_value_error():
    hidden, weight, _ = random_head(2, 3, 4, 9)
    with pytest.raises(ValueError, match="support"):
        support_logprobs(hidden, weight, torch.zeros(2, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError):
        token_logprobs(hidden, weight, torch.zeros(3, 3, dtype=torch.long))


# ---------------------------------------------------------------- memory (deterministic, not timed)


def saved_tensors(fn):
    """Run fn() and return the tensors autograd saved for its backward pass."""
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return saved


def saved_bytes_beyond_inputs(fn, *inputs):
    """Bytes saved for backward, not counting tensors that are the inputs themselves (kept alive anyway)."""
    input_ptrs = {x.data_ptr() for x in inputs}
    return sum(t.numel() * t.element_size() for t in saved_tensors(fn) if t.data_ptr() not in input_ptrs)


@pytest.mark.parametrize("T", [32, 256])
@pytest.mark.parametrize("V", [512, 4096])
def test_token_logprobs_saves_no_vocabulary_sized_tensor(T, V):
    B, H = 2, 16
    hidden = torch.randn(B, T, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    tokens = torch.randint(0, V, (B, T))
    N = B * T
    extra = saved_bytes_beyond_inputs(lambda: token_logprobs(hidden, weight, tokens, chunk_size=16), hidden, weight)
    # What may be saved beyond hidden and weight: the token ids and one log-sum-exp per position,
    # a few bytes per position and nothing that scales with V.
    assert extra <= 16 * N
    assert all(t.numel() < N * V for t in saved_tensors(lambda: token_logprobs(hidden, weight, tokens, 16)))


def test_saved_bytes_probe_sees_the_naive_logits():
    # The same probe on the naive computation finds its [N, V] fp32 tensors: the check above can fail.
    B, T, H, V = 2, 32, 16, 4096
    hidden = torch.randn(B, T, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    tokens = torch.randint(0, V, (B, T))
    extra = saved_bytes_beyond_inputs(
        lambda: naive_log_softmax(hidden, weight).gather(-1, tokens[..., None]), hidden, weight
    )
    assert extra >= B * T * V * 4


def test_token_logprobs_saved_bytes_do_not_grow_with_vocabulary_times_length():
    H = 16
    extras = {}
    for T, V in [(64, 512), (64, 8192), (512, 512), (512, 8192)]:
        hidden = torch.randn(1, T, H, requires_grad=True)
        weight = torch.randn(V, H, requires_grad=True)
        tokens = torch.randint(0, V, (1, T))
        extras[T, V] = saved_bytes_beyond_inputs(
            lambda: token_logprobs(hidden, weight, tokens, chunk_size=32), hidden, weight
        )
    assert extras[64, 8192] == extras[64, 512]  # independent of V
    assert extras[512, 8192] == extras[512, 512]
    assert extras[512, 512] <= 8 * extras[64, 512]  # at most linear in T


def test_topk_excludes_tokens_but_keeps_them_in_the_normaliser():
    torch.manual_seed(0)
    hidden, weight = torch.randn(3, 8), torch.randn(20, 8)
    logp_all = torch.log_softmax(hidden @ weight.T, dim=-1)
    top = logp_all.argmax(dim=-1)
    exclude = top.unique()
    values, ids = topk_logprobs(hidden, weight, 4, exclude=exclude)
    assert not torch.isin(ids, exclude).any()
    torch.testing.assert_close(values, logp_all.gather(1, ids))  # full-vocabulary log-probs
    kept = logp_all.clone()
    kept[:, exclude] = float("-inf")
    torch.testing.assert_close(ids, kept.topk(4, dim=-1).indices)
