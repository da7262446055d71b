"""The CPU decode kernels: attention against a float64 reference (masks, grouped queries, head sizes with
and without a compiled specialisation, cache prefixes, bfloat16, threads); the fused layer attention,
RMSNorm, SiLU gating and sampling against the engine's PyTorch ops; the float32 projections and MLP
against float64 matmuls; the build cache; and the fallback
when they cannot be built."""

import contextlib
import logging
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from lit_opd.rollout import cpu_kernels
from lit_opd.rollout.engine import SamplingConfig
from lit_opd.rollout.fast import apply_rope, rms_norm
from lit_opd.rollout.fast import sample_tokens as torch_sample_tokens

pytestmark = pytest.mark.skipif(cpu_kernels.load() is None, reason="no C++ toolchain to build the kernels")


@contextlib.contextmanager
def threads(count: int):
    """torch (hence the kernels) uses `count` threads inside."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def reference(q, keys, values, valid, scale):
    """softmax(q kᵀ · scale, masked) v in float64. q: [B, H, G, D]; keys, values: [B, H, L, D]; valid: [B, L]."""
    scores = torch.einsum("bhgd,bhld->bhgl", q.double(), keys.double()) * scale
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    return torch.einsum("bhgl,bhld->bhgd", torch.softmax(scores, dim=-1), values.double())


def random_case(B=3, H=2, G=2, D=64, cache_len=20, L=13, dtype=torch.float32, seed=0):
    """Inputs as the engine passes them: keys and values the first L columns of a longer cache (strided),
    valid a prefix of the cache's valid columns, left padding in some rows."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, G, D, generator=generator).to(dtype)
    keys = torch.randn(B, H, cache_len, D, generator=generator).to(dtype)[:, :, :L]
    values = torch.randn(B, H, cache_len, D, generator=generator).to(dtype)[:, :, :L]
    valid = torch.ones(B, cache_len, dtype=torch.bool)
    valid[0, :4] = False
    valid[-1, :L - 1] = False  # only the newest column
    return q, keys, values, valid[:, :L]


@pytest.mark.parametrize("D", [8, 64, 128, 96])
@pytest.mark.parametrize("G", [1, 2, 4])
def test_equals_softmax_attention_in_float32(D, G):
    q, keys, values, valid = random_case(G=G, D=D)
    out = cpu_kernels.decode_attention(q, keys, values, valid, D**-0.5)
    assert out.shape == q.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference(q, keys, values, valid, D**-0.5), atol=2e-6, rtol=0)


def test_a_row_with_one_valid_column_returns_that_value():
    q, keys, values, valid = random_case()
    out = cpu_kernels.decode_attention(q, keys, values, valid, 0.125)
    torch.testing.assert_close(out[-1], values[-1, :, -1:].expand_as(out[-1]), atol=1e-6, rtol=0)


def test_masked_columns_do_not_matter_even_when_they_hold_nan():
    q, keys, values, valid = random_case()
    expected = cpu_kernels.decode_attention(q, keys, values, valid, 0.125)
    keys, values = keys.clone(), values.clone()
    keys[0, :, :4], values[0, :, :4] = float("nan"), float("nan")
    keys[-1, :, :-1] = 1e30
    torch.testing.assert_close(cpu_kernels.decode_attention(q, keys, values, valid, 0.125), expected)


def test_bfloat16_is_close_to_the_float64_reference():
    q, keys, values, valid = random_case(dtype=torch.bfloat16, L=40, cache_len=50)
    out = cpu_kernels.decode_attention(q, keys, values, valid, 0.125)
    assert out.dtype == torch.bfloat16
    # Sums are float32: the error is the output's own rounding (2^-8 relative), not accumulated.
    torch.testing.assert_close(out.double(), reference(q, keys, values, valid, 0.125), atol=2e-2, rtol=0)
    # and the rounding is torch's (to nearest even)
    exact = reference(q, keys, values, valid, 0.125).float()
    assert (out.float() - exact).abs().le((exact.bfloat16().float() - exact).abs() + 1e-6).float().mean() > 0.95


def test_threads_give_the_same_result():
    q, keys, values, valid = random_case(B=16, L=30, cache_len=30)
    with threads(1):
        one = cpu_kernels.decode_attention(q, keys, values, valid, 0.125)
    with threads(2):
        two = cpu_kernels.decode_attention(q, keys, values, valid, 0.125)
    assert torch.equal(one, two)


def test_does_not_apply_to_mixed_or_other_dtypes():
    q, keys, values, valid = random_case()
    assert cpu_kernels.decode_attention(q.bfloat16(), keys, values, valid, 0.125) is None
    assert cpu_kernels.decode_attention(q.half(), keys.half(), values.half(), valid, 0.125) is None


def test_shape_mismatches_are_named():
    q, keys, values, valid = random_case()
    with pytest.raises(ValueError, match=r"valid \[B, L\]; got .* valid \(3, 12\)"):
        cpu_kernels.decode_attention(q, keys, values, valid[:, 1:], 0.125)
    with pytest.raises(ValueError, match=r"got q \(3, 2, 128\)"):
        cpu_kernels.decode_attention(q.flatten(2), keys, values, valid, 0.125)


def test_a_failed_build_falls_back_and_says_why_once(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("LIT_OPD_KERNEL_DIR", str(tmp_path / "kernels"))
    cpu_kernels.load.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="lit_opd.rollout.cpu_kernels"):
            q, keys, values, valid = random_case()
            assert cpu_kernels.decode_attention(q, keys, values, valid, 0.125) is None
            assert cpu_kernels.decode_attention(q, keys, values, valid, 0.125) is None
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "no-such-compiler" in warnings[0]
    finally:
        cpu_kernels.load.cache_clear()


def test_loading_the_kernel_keeps_subnormal_floats():
    """A library linked with -ffast-math would switch on flush-to-zero for the whole process."""
    assert cpu_kernels.load() is not None
    tiny = sys.float_info.min
    assert tiny / 2 > 0
    assert torch.tensor(tiny, dtype=torch.float64).div(2).item() > 0


def test_builds_into_the_kernel_dir_and_reuses_the_library(monkeypatch, tmp_path):
    monkeypatch.setenv("LIT_OPD_KERNEL_DIR", str(tmp_path))
    cpu_kernels.load.cache_clear()
    try:
        assert cpu_kernels.load() is not None
        (library,) = tmp_path.glob("cpu_kernels_*.so")
        built = library.stat().st_mtime_ns
        cpu_kernels.load.cache_clear()
        assert cpu_kernels.load() is not None and library.stat().st_mtime_ns == built
        assert [p.name for p in tmp_path.iterdir()] == [library.name]  # no scratch left behind
    finally:
        cpu_kernels.load.cache_clear()


def test_the_engine_attention_agrees_with_and_without_the_kernel():
    """The decode step's attention through the kernel and through SDPA (the fallback), on the engine's
    own grouped layout and mask."""
    from lit_opd.rollout.fast import _Decoder

    q, keys, values, valid = random_case(B=4, H=2, G=2, D=16, L=9, cache_len=12)
    attend = valid[:, None, None, :]
    decoder = object.__new__(_Decoder)
    decoder.num_kv_heads, decoder.scaling = 2, 0.25
    outputs = []
    for kernel in (True, False):
        decoder.cpu_kernel = kernel
        outputs.append(decoder._attention(q.reshape(4, 1, 4, 16), keys, values, attend))
    torch.testing.assert_close(outputs[0], outputs[1], atol=2e-6, rtol=0)
    expected = F.scaled_dot_product_attention(q, keys, values, attn_mask=attend, scale=0.25)
    torch.testing.assert_close(outputs[0], expected.reshape(4, 1, 4, 16), atol=2e-6, rtol=0)


def mostly_equal(actual, expected, share=0.99):
    """bfloat16 results of a different float32 summation order: at most a 1-ulp flip in a few elements."""
    torch.testing.assert_close(actual.float(), expected.float(), atol=1e-30, rtol=2**-7)
    assert actual.eq(expected).float().mean() >= share


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_is_the_residual_add_then_hf_rmsnorm(dtype):
    generator = torch.Generator().manual_seed(0)
    x, delta = (torch.randn(6, 96, generator=generator).to(dtype) for _ in range(2))
    weight = (torch.rand(96, generator=generator) + 0.5).to(dtype)
    added = x + delta
    out = cpu_kernels.add_rms_norm(x, delta, weight, 1e-6)
    assert torch.equal(x, added), "x holds the residual sum (rounded like torch's add)"
    expected = rms_norm(added, weight, 1e-6)
    if dtype == torch.float32:
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    else:
        mostly_equal(out, expected)
    unchanged = x.clone()
    torch.testing.assert_close(cpu_kernels.add_rms_norm(x, None, weight, 1e-6), out, atol=0, rtol=0)
    assert torch.equal(x, unchanged)


def test_add_rms_norm_by_hand():
    x = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    out = cpu_kernels.add_rms_norm(x, torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([1.0, 2.0]), 0.0)
    # row 0: (2, −2), rms 2 → (1, −2); row 1: (3, 4), rms sqrt(12.5)
    torch.testing.assert_close(out, torch.tensor([[1.0, -2.0], [3 / 12.5**0.5, 8 / 12.5**0.5]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_is_hf_mlp_gating(dtype):
    generator = torch.Generator().manual_seed(1)
    gate, up = (torch.randn(5, 300, generator=generator).mul(4).to(dtype) for _ in range(2))
    gate[0, :3] = torch.tensor([-200.0, 200.0, 0.0])  # saturation: exp must not overflow into NaN
    expected = F.silu(gate) * up
    out = cpu_kernels.silu_mul(gate, up)
    assert out is gate
    if dtype == torch.float32:
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    else:
        mostly_equal(out, expected)


def float64_linear(x, weight, bias=None):
    out = x.double() @ weight.double().T
    return out if bias is None else out + bias.double()


@pytest.mark.parametrize(
    ("M", "K", "Ns"), [(64, 256, (256, 128, 128)), (1, 3, (1,)), (17, 33, (7, 12)), (70, 16, (6, 5)), (130, 40, (13,))]
)
@pytest.mark.parametrize("bias", [False, True])
def test_linear_is_each_projection_of_the_input(M, K, Ns, bias):
    """Row counts below, at and past one register chunk (16 / 64 rows), weights of 1 to 256 rows (tiles of 6
    and their remainders), several projections of one input in one call."""
    generator = torch.Generator().manual_seed(M + K)
    x = torch.randn(M, K, generator=generator)
    projections = [
        (torch.randn(N, K, generator=generator), torch.randn(N, generator=generator) if bias else None) for N in Ns
    ]
    outs = cpu_kernels.linear(x, projections)
    for out, (weight, b) in zip(outs, projections, strict=True):
        assert out.shape == (M, weight.shape[0]) and out.dtype == torch.float32
        torch.testing.assert_close(out.double(), float64_linear(x, weight, b), atol=1e-4, rtol=1e-5)


def test_linear_by_hand_reads_the_live_weight():
    x = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    weight, bias = torch.tensor([[3.0, 4.0], [5.0, 6.0], [0.0, -1.0]]), torch.tensor([0.5, 0.0, 1.0])
    (out,) = cpu_kernels.linear(x, [(weight, bias)])
    torch.testing.assert_close(out, torch.tensor([[11.5, 17.0, -1.0], [-3.5, -6.0, 2.0]]))
    weight.add_(1.0)  # an optimiser step in place: the next call reads the new values
    (out,) = cpu_kernels.linear(x, [(weight, None)])
    torch.testing.assert_close(out, torch.tensor([[14.0, 20.0, 1.0], [-5.0, -7.0, 0.0]]))


def test_linear_returns_float32_whatever_the_default_dtype():
    x, weight = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 4.0], [5.0, 6.0]])
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        (out,) = cpu_kernels.linear(x, [(weight, None)])
    finally:
        torch.set_default_dtype(default)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([[11.0, 17.0]]))


@pytest.mark.parametrize(("M", "H", "I"), [(64, 256, 1024), (5, 24, 40), (33, 16, 7)])
@pytest.mark.parametrize("bias", [False, True])
def test_gated_mlp_is_hf_silu_mlp(M, H, I, bias):
    generator = torch.Generator().manual_seed(M)
    x = torch.randn(M, H, generator=generator)

    def projection(rows, columns):
        weight = torch.randn(rows, columns, generator=generator) / columns**0.5
        return weight, torch.randn(rows, generator=generator) if bias else None

    gate, up, down = projection(I, H), projection(I, H), projection(H, I)
    gate[0][0] *= 1e3  # saturation: silu of ±hundreds must stay finite
    expected = float64_linear(F.silu(float64_linear(x, *gate)) * float64_linear(x, *up), *down)
    out = cpu_kernels.gated_mlp(x, gate, up, down)
    assert out.isfinite().all()
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)


def test_the_projections_after_a_norm_are_add_rms_norm_then_the_projections():
    """The fused residual add and RMSNorm give the same bits as add_rms_norm, then the plain projections."""
    generator = torch.Generator().manual_seed(4)
    x, delta = torch.randn(21, 48, generator=generator), torch.randn(21, 48, generator=generator)
    norm = torch.rand(48, generator=generator) + 0.5
    projections = [(torch.randn(n, 48, generator=generator), None) for n in (10, 48)]
    mlp = [(torch.randn(n, k, generator=generator), None) for n, k in ((30, 48), (30, 48), (48, 30))]
    kernels = (
        lambda y, *normed: cpu_kernels.linear(y, projections, *normed),
        lambda y, *normed: [cpu_kernels.gated_mlp(y, *mlp, *normed)],
    )
    for with_delta in (None, delta):
        for kernel in kernels:
            y, reference_x = x.clone(), x.clone()
            expected = kernel(cpu_kernels.add_rms_norm(reference_x, with_delta, norm, 1e-6))
            outs = kernel(y, norm, with_delta, 1e-6)
            assert torch.equal(y, reference_x), "x holds the residual sum, as add_rms_norm leaves it"
            assert all(torch.equal(a, b) for a, b in zip(outs, expected, strict=True))


def test_the_projections_give_the_same_bits_on_one_and_two_threads():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(70, 32, generator=generator)
    weights = [(torch.randn(n, 32, generator=generator), None) for n in (20, 48)]
    down = (torch.randn(32, 48, generator=generator), None)
    results = []
    for count in (1, 2):
        with threads(count):
            results.append([*cpu_kernels.linear(x, weights), cpu_kernels.gated_mlp(x, *weights[1:] * 2, down)])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def layer_case(D, G, norms, dtype=torch.float32, B=3, Hkv=2, cache_len=12, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(dtype)

    angles = torch.arange(cache_len)[:, None] * torch.rand(D // 2, generator=generator).repeat(2)
    norm_weights = [(torch.rand(D, generator=generator) + 0.5).to(dtype) for _ in range(2)] if norms else [None, None]
    valid = torch.ones(B, cache_len, dtype=torch.bool)
    valid[0, :3] = False
    valid[-1, :8] = False
    return dict(
        q=randn(B, Hkv * G * D), k=randn(B, Hkv * D), v=randn(B, Hkv * D),
        q_norm=norm_weights[0], k_norm=norm_weights[1],
        cos=angles.cos().to(dtype), sin_signed=torch.cat([-angles[:, : D // 2].sin(), angles[:, D // 2 :].sin()], 1).to(dtype),
        positions=torch.randint(0, cache_len, (B, 1), generator=generator), cache_keys=randn(B, Hkv, cache_len, D),
        cache_values=randn(B, Hkv, cache_len, D), valid=valid,
    )


def layer_reference(case, slot, kv_len, scale, eps):
    """The engine's PyTorch ops for the same step: q/k RMSNorm, RoPE, the cache write, then attention in
    float64. Returns (out [B, H·D], keys, values)."""
    B, Hkv, _, D = case["cache_keys"].shape
    q = case["q"].view(B, 1, -1, D)
    k = case["k"].view(B, 1, Hkv, D)
    if case["q_norm"] is not None:
        q, k = rms_norm(q, case["q_norm"], eps), rms_norm(k, case["k_norm"], eps)
    cos = case["cos"][case["positions"]].unsqueeze(2)
    sin = case["sin_signed"][case["positions"]].unsqueeze(2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    keys, values = case["cache_keys"].clone(), case["cache_values"].clone()
    keys[:, :, slot], values[:, :, slot] = k[:, 0], case["v"].view(B, Hkv, D)
    grouped = q.view(B, Hkv, -1, D)
    valid = case["valid"][:, :kv_len]
    out = reference(grouped, keys[:, :, :kv_len], values[:, :, :kv_len], valid, scale)
    return out.reshape(B, -1), keys, values


@pytest.mark.parametrize(("D", "G", "norms"), [(64, 2, True), (8, 1, False), (128, 4, True), (16, 2, False)])
def test_decode_layer_attention_is_norm_rope_cache_write_and_attention(D, G, norms):
    case = layer_case(D, G, norms)
    slot, kv_len = 8, 9
    expected, keys, values = layer_reference(case, slot, kv_len, D**-0.5, 1e-6)
    out = cpu_kernels.decode_layer_attention(**case, slot=slot, kv_len=kv_len, scale=D**-0.5, eps=1e-6)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=0)
    torch.testing.assert_close(case["cache_keys"], keys, atol=1e-6, rtol=0)
    assert torch.equal(case["cache_values"], values)  # the value column written as is, the rest untouched
    assert torch.equal(case["cache_keys"][:, :, torch.arange(12) != slot], keys[:, :, torch.arange(12) != slot])


def test_decode_layer_attention_in_bfloat16_rounds_like_the_engine():
    case = layer_case(64, 2, True, dtype=torch.bfloat16)
    expected, keys, _ = layer_reference(case, 8, 9, 0.125, 1e-6)
    out = cpu_kernels.decode_layer_attention(**case, slot=8, kv_len=9, scale=0.125, eps=1e-6)
    assert out.dtype == torch.bfloat16
    mostly_equal(case["cache_keys"], keys)
    torch.testing.assert_close(out.double(), expected, atol=3e-2, rtol=0)


SAMPLERS = [
    SamplingConfig(temperature=0),
    SamplingConfig(temperature=1.0),
    SamplingConfig(temperature=0.7, top_k=5),
    SamplingConfig(temperature=1.3, top_p=0.8),
    SamplingConfig(temperature=1.0, top_k=12, top_p=0.6),
    SamplingConfig(temperature=0.9, top_k=1),
]


def sample_case(B=7, V=50, N=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return dict(
        logits=torch.randn(B, V, generator=generator) * 3,
        uniform=torch.rand(B, V, generator=generator),
        done=torch.zeros(B, dtype=torch.bool),
        out_ids=torch.full((B, N), -1, dtype=torch.long),
        out_mask=torch.ones(B, N, dtype=torch.bool),
        out_logp=torch.full((B, N), 9.0),
        out_sample_logp=torch.full((B, N), 9.0),
        tokens=torch.full((B, 1), -1, dtype=torch.long),
    )


def sample(case, sampling, eos=(), pad=0, step=2):
    cpu_kernels.sample_tokens(
        case["logits"], None if sampling.temperature == 0 else case["uniform"], sampling.temperature,
        sampling.top_k, sampling.top_p, case["done"], torch.tensor(eos, dtype=torch.long), pad, step,
        case["out_ids"], case["out_mask"], case["out_logp"], case["out_sample_logp"], case["tokens"],
    )


@pytest.mark.parametrize("sampling", SAMPLERS, ids=str)
def test_sample_tokens_draws_what_the_torch_sampler_draws(sampling):
    """Same logits, same uniforms: the same tokens and log-probs as fast.sample_tokens (the engine's
    PyTorch sampler, whose distribution test_fast_engine checks)."""
    case = sample_case()
    uniform = None if sampling.temperature == 0 else case["uniform"]
    tokens, logp, sample_logp = torch_sample_tokens(case["logits"], sampling, uniform)
    sample(case, sampling)
    assert torch.equal(case["out_ids"][:, 2], tokens) and torch.equal(case["tokens"][:, 0], tokens)
    torch.testing.assert_close(case["out_logp"][:, 2], logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(case["out_sample_logp"][:, 2], sample_logp, atol=1e-5, rtol=0)
    assert case["out_mask"][:, 2].all() and not case["done"].any()
    assert (case["out_ids"][:, [0, 1, 3, 4, 5]] == -1).all(), "only column `step` is written"


def test_sample_tokens_by_hand():
    """Two tokens with logits (0, log 3): p = (1/4, 3/4). Uniforms (e^-1, e^-4) give E = (1, 4) and the race
    q/E = (1/4, 3/16): token 0 wins; at temperature 0 token 1; with top_p 0.5 only token 1 is kept."""
    case = sample_case(B=1, V=2, N=1)
    case["logits"] = torch.tensor([[0.0, math.log(3)]])
    case["uniform"] = torch.tensor([[math.exp(-1), math.exp(-4)]])
    sample(case, SamplingConfig(temperature=1.0), step=0)
    assert case["out_ids"].item() == 0
    assert case["out_logp"].item() == pytest.approx(math.log(0.25)) == case["out_sample_logp"].item()
    sample(case, SamplingConfig(temperature=0), step=0)
    assert case["out_ids"].item() == 1 and case["out_sample_logp"].item() == 0
    sample(case, SamplingConfig(temperature=1.0, top_p=0.5), step=0)
    assert case["out_ids"].item() == 1 and case["out_sample_logp"].item() == 0


def test_sample_tokens_pads_done_rows_and_stops_rows_at_eos():
    case = sample_case(B=4)
    case["logits"][1, 17] = case["logits"][2, 17] = 100.0  # rows 1 and 2 draw token 17
    case["done"][2] = True
    sample(case, SamplingConfig(temperature=1.0), eos=(17, 40), pad=3)
    assert case["out_ids"][2, 2] == 3 and case["tokens"][2, 0] == 3
    assert case["out_ids"][1, 2] == 17 and case["done"].tolist() == [False, True, True, False]
    assert case["out_mask"][:, 2].tolist() == [True, True, False, True]
    assert case["out_logp"][2, 2] == 0 and case["out_sample_logp"][2, 2] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_kernels_give_the_same_bits_on_one_and_two_threads(dtype):
    results = []
    for count in (1, 2):
        with threads(count):
            case = layer_case(64, 2, True, dtype=dtype, B=9)
            attention = cpu_kernels.decode_layer_attention(**case, slot=8, kv_len=9, scale=0.125, eps=1e-6)
            x = case["q"].clone()
            normed = cpu_kernels.add_rms_norm(x, case["q"], torch.ones(x.shape[1], dtype=dtype), 1e-6)
            gated = cpu_kernels.silu_mul(case["q"].clone(), case["q"])
            drawn = sample_case(B=9)
            sample(drawn, SamplingConfig(temperature=1.0, top_p=0.9))
            results.append([attention, case["cache_keys"], x, normed, gated, drawn["out_ids"], drawn["out_logp"]])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_the_fused_kernels_name_a_wrong_argument_instead_of_reading_past_it():
    case = layer_case(64, 2, True)
    arguments = dict(slot=8, kv_len=9, scale=0.125, eps=1e-6)
    with pytest.raises(ValueError, match=r"decode_layer_attention: valid must be .* shape \(3, 12\); got torch.bool \(3, 11\)"):
        cpu_kernels.decode_layer_attention(**{**case, "valid": case["valid"][:, 1:]}, **arguments)
    with pytest.raises(ValueError, match=r"k must be .*, not contiguous"):
        cpu_kernels.decode_layer_attention(**{**case, "k": case["k"].t().contiguous().t()}, **arguments)
    with pytest.raises(ValueError, match=r"slot < kv_len ≤ cache_len, got 9, 9, 12"):
        cpu_kernels.decode_layer_attention(**case, **{**arguments, "slot": 9})
    with pytest.raises(ValueError, match=r"add_rms_norm: implemented for .* got torch.float16"):
        cpu_kernels.add_rms_norm(torch.ones(2, 4, dtype=torch.half), None, torch.ones(4, dtype=torch.half), 1e-6)
    with pytest.raises(ValueError, match=r"silu_mul: up must be .* shape \(2, 4\)"):
        cpu_kernels.silu_mul(torch.ones(2, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"linear: x must be a contiguous CPU torch.float32 tensor"):
        cpu_kernels.linear(torch.ones(2, 4, dtype=torch.bfloat16), [(torch.ones(3, 4, dtype=torch.bfloat16), None)])
    with pytest.raises(ValueError, match=r"linear: weight 1 must be .* shape \(3, 4\); got torch.float32 \(3, 5\)"):
        cpu_kernels.linear(torch.ones(2, 4), [(torch.ones(3, 4), None), (torch.ones(3, 5), None)])
    with pytest.raises(ValueError, match=r"linear: delta is added only before a norm"):
        cpu_kernels.linear(torch.ones(2, 4), [(torch.ones(3, 4), None)], delta=torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"gated_mlp: norm must be .* shape \(4,\)"):
        cpu_kernels.gated_mlp(
            torch.ones(2, 4), *[(torch.ones(6, 4), None)] * 2, (torch.ones(4, 6), None), torch.ones(5)
        )
    with pytest.raises(ValueError, match=r"gated_mlp: down weight must be .* shape \(4, 6\)"):
        cpu_kernels.gated_mlp(
            torch.ones(2, 4), (torch.ones(6, 4), None), (torch.ones(6, 4), None), (torch.ones(6, 4), None)
        )
    drawn = sample_case()
    with pytest.raises(ValueError, match="uniform is needed exactly when temperature > 0"):
        cpu_kernels.sample_tokens(
            drawn["logits"], None, 1.0, 0, 1.0, drawn["done"], torch.tensor([], dtype=torch.long), 0, 2,
            drawn["out_ids"], drawn["out_mask"], drawn["out_logp"], drawn["out_sample_logp"], drawn["tokens"],
        )
