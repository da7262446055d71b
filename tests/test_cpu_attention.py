"""The CPU decode-attention kernel against a float64 reference: masks, grouped queries, head sizes with
and without a compiled specialisation, cache prefixes, bfloat16, threads; its build cache; and the
fallback when it cannot be built."""

import logging
import sys

import pytest
import torch
import torch.nn.functional as F

from lit_opd.rollout import cpu_attention

pytestmark = pytest.mark.skipif(cpu_attention.load() is None, reason="no C++ toolchain to build the kernel")


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
    out = cpu_attention.decode_attention(q, keys, values, valid, D**-0.5)
    assert out.shape == q.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference(q, keys, values, valid, D**-0.5), atol=2e-6, rtol=0)


def test_a_row_with_one_valid_column_returns_that_value():
    q, keys, values, valid = random_case()
    out = cpu_attention.decode_attention(q, keys, values, valid, 0.125)
    torch.testing.assert_close(out[-1], values[-1, :, -1:].expand_as(out[-1]), atol=1e-6, rtol=0)


def test_masked_columns_do_not_matter_even_when_they_hold_nan():
    q, keys, values, valid = random_case()
    expected = cpu_attention.decode_attention(q, keys, values, valid, 0.125)
    keys, values = keys.clone(), values.clone()
    keys[0, :, :4], values[0, :, :4] = float("nan"), float("nan")
    keys[-1, :, :-1] = 1e30
    torch.testing.assert_close(cpu_attention.decode_attention(q, keys, values, valid, 0.125), expected)


def test_bfloat16_is_close_to_the_float64_reference():
    q, keys, values, valid = random_case(dtype=torch.bfloat16, L=40, cache_len=50)
    out = cpu_attention.decode_attention(q, keys, values, valid, 0.125)
    assert out.dtype == torch.bfloat16
    # Sums are float32: the error is the output's own rounding (2^-8 relative), not accumulated.
    torch.testing.assert_close(out.double(), reference(q, keys, values, valid, 0.125), atol=2e-2, rtol=0)
    # and the rounding is torch's (to nearest even)
    exact = reference(q, keys, values, valid, 0.125).float()
    assert (out.float() - exact).abs().le((exact.bfloat16().float() - exact).abs() + 1e-6).float().mean() > 0.95


def test_threads_give_the_same_result():
    q, keys, values, valid = random_case(B=16, L=30, cache_len=30)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_attention.decode_attention(q, keys, values, valid, 0.125)
        torch.set_num_threads(2)
        two = cpu_attention.decode_attention(q, keys, values, valid, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_does_not_apply_to_mixed_or_other_dtypes():
    q, keys, values, valid = random_case()
    assert cpu_attention.decode_attention(q.bfloat16(), keys, values, valid, 0.125) is None
    assert cpu_attention.decode_attention(q.half(), keys.half(), values.half(), valid, 0.125) is None


def test_shape_mismatches_are_named():
    q, keys, values, valid = random_case()
    with pytest.raises(ValueError, match=r"valid \[B, L\]; got .* valid \(3, 12\)"):
        cpu_attention.decode_attention(q, keys, values, valid[:, 1:], 0.125)
    with pytest.raises(ValueError, match=r"got q \(3, 2, 128\)"):
        cpu_attention.decode_attention(q.flatten(2), keys, values, valid, 0.125)


def test_a_failed_build_falls_back_and_says_why_once(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("LIT_OPD_KERNEL_DIR", str(tmp_path / "kernels"))
    cpu_attention.load.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="lit_opd.rollout.cpu_attention"):
            q, keys, values, valid = random_case()
            assert cpu_attention.decode_attention(q, keys, values, valid, 0.125) is None
            assert cpu_attention.decode_attention(q, keys, values, valid, 0.125) is None
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "no-such-compiler" in warnings[0]
    finally:
        cpu_attention.load.cache_clear()


def test_loading_the_kernel_keeps_subnormal_floats():
    """A library linked with -ffast-math would switch on flush-to-zero for the whole process."""
    assert cpu_attention.load() is not None
    tiny = sys.float_info.min
    assert tiny / 2 > 0
    assert torch.tensor(tiny, dtype=torch.float64).div(2).item() > 0


def test_builds_into_the_kernel_dir_and_reuses_the_library(monkeypatch, tmp_path):
    monkeypatch.setenv("LIT_OPD_KERNEL_DIR", str(tmp_path))
    cpu_attention.load.cache_clear()
    try:
        assert cpu_attention.load() is not None
        (library,) = tmp_path.glob("decode_attention_*.so")
        built = library.stat().st_mtime_ns
        cpu_attention.load.cache_clear()
        assert cpu_attention.load() is not None and library.stat().st_mtime_ns == built
        assert [p.name for p in tmp_path.iterdir()] == [library.name]  # no scratch left behind
    finally:
        cpu_attention.load.cache_clear()


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
