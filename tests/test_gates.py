"""Drift and sign-consistency gates: hand-computed values, invariants, bad input.

Expected numbers were worked out from the formula with math.exp on the tiny inputs shown
(derivation in the comments), not by running the gate code.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lit_opd.gates import drift_gate, sign_consistency_gate

NAN = float("nan")


def drift_inputs(drift, mask):
    """logp = old_logp + drift, with old_logp a fixed non-trivial baseline (NaN where masked out)."""
    drift = torch.tensor(drift, dtype=torch.float64)
    mask = torch.tensor(mask)
    old = (-1.0 - torch.arange(drift.numel(), dtype=torch.float64).reshape(drift.shape) / 10).masked_fill(~mask, NAN)
    return old + drift, old, mask


# Token unit, every position valid: d = [[0, 0.5], [−1, 0]].
# r = exp(−|d|) = [1, e^−0.5, e^−1, 1] = [1, 0.6065306597, 0.3678794412, 1]; mean(r) = 0.7436025252
# g = r / mean(r) = [1.3448044702, 0.8156651425, 0.4947259170, 1.3448044702]
TOKEN_DRIFT = [[0.0, 0.5], [-1.0, 0.0]]
TOKEN_GATE = [[1.3448044702413735, 0.8156651425199988], [0.49472591699725404, 1.3448044702413735]]


def test_token_gate_hand_values():
    logp, old, mask = drift_inputs(TOKEN_DRIFT, [[True, True], [True, True]])
    gate = drift_gate(logp, old, mask, unit="token")
    torch.testing.assert_close(gate, torch.tensor(TOKEN_GATE, dtype=torch.float64), rtol=0, atol=1e-12)


# Block unit, block_size 2, one row whose first masked-in position is 1 (left-shifted mask):
#   positions 1..5 hold d = [0.2, −0.4, 0.0, 1.0, −0.6]; blocks {1, 2}, {3, 4}, {5} (last one partial).
# sharpness λ = 2, r = exp(−2·D), g = r / ((2·r_0 + 2·r_1 + r_2) / 5):
BLOCK_DRIFT = [[123.0, 0.2, -0.4, 0.0, 1.0, -0.6]]
BLOCK_MASK = [[False, True, True, True, True, True]]
BLOCK_GATES = {
    # D = [0.3, 0.5, 0.6]
    "mean_abs": [1.285528231085298, 0.861715343041211, 0.7055128517469823],
    # D = [−0.1, 0.5, −0.6]
    "mean": [0.939731229886718, 0.2830416071950144, 2.554454325836535],
    # D = [0.4, 1.0, 0.6]
    "max_abs": [1.5277865554012584, 0.46016046752413997, 1.0241059541492026],
    # D = [√((0.04 + 0.16)/2) = √0.1, √((0 + 1)/2) = √0.5, 0.6]
    "rms": [1.4359079062338265, 0.6570726462580849, 0.814038895016177],
}


@pytest.mark.parametrize("agg", list(BLOCK_GATES))
def test_block_gate_counts_blocks_from_first_masked_in_position(agg):
    logp, old, mask = drift_inputs(BLOCK_DRIFT, BLOCK_MASK)
    gate = drift_gate(logp, old, mask, unit="block", block_size=2, agg=agg, sharpness=2.0)
    a, b, c = BLOCK_GATES[agg]
    expected = torch.tensor([[0.0, a, a, b, b, c]], dtype=torch.float64)
    torch.testing.assert_close(gate, expected, rtol=0, atol=1e-12)


def test_block_gate_rows_with_different_offsets_are_independent():
    # Row 0 is BLOCK_DRIFT; row 1 is the same response starting at position 0 (right-padded). Both
    # rows must get the same per-block values at their own positions.
    logp0, old0, mask0 = drift_inputs(BLOCK_DRIFT, BLOCK_MASK)
    logp1, old1, mask1 = drift_inputs([[0.2, -0.4, 0.0, 1.0, -0.6, 55.0]], [[True, True, True, True, True, False]])
    gate = drift_gate(torch.cat([logp0, logp1]), torch.cat([old0, old1]), torch.cat([mask0, mask1]), block_size=2)
    torch.testing.assert_close(gate[0, 1:], gate[1, :5], rtol=0, atol=1e-12)
    assert gate[0, 0] == 0 and gate[1, 5] == 0


def test_span_gate_hand_values():
    # span_ends marks the last token of each span: spans {0, 1} and {2, 3, 4}.
    # d = [0.2, −0.4, 0.3, 0.0, −0.3] → D = [0.3, 0.2]; r = [e^−0.3, e^−0.2]
    # mean(r) = (2·e^−0.3 + 3·e^−0.2) / 5 → g = [0.9406430256, 1.0395713162]
    logp, old, mask = drift_inputs([[0.2, -0.4, 0.3, 0.0, -0.3]], [[True] * 5])
    span_ends = torch.tensor([[False, True, False, False, True]])
    gate = drift_gate(logp, old, mask, unit="span", span_ends=span_ends)
    a, b = 0.9406430256467649, 1.03957131623549
    torch.testing.assert_close(gate, torch.tensor([[a, a, b, b, b]], dtype=torch.float64), rtol=0, atol=1e-12)


def test_span_without_final_delimiter_closes_at_the_end_of_the_response():
    logp, old, mask = drift_inputs([[0.2, -0.4, 0.3, 0.0, -0.3]], [[True] * 5])
    with_end = drift_gate(logp, old, mask, unit="span", span_ends=torch.tensor([[False, True, False, False, True]]))
    without = drift_gate(logp, old, mask, unit="span", span_ends=torch.tensor([[False, True, False, False, False]]))
    torch.testing.assert_close(with_end, without, rtol=0, atol=0)


def test_sequence_gate_hand_values():
    # Row 0: d = [0.2, −0.4] → D = 0.3; row 1: d = [1.0, 0.0, −0.5] → D = 0.5 (third slot padded).
    # r = [e^−0.3 ×2, e^−0.5 ×2]; mean = (e^−0.3 + e^−0.5) / 2 = 0.6736956...
    # g = e^−0.3 / mean = 1.0996679946, e^−0.5 / mean = 0.9003320053
    logp, old, mask = drift_inputs([[0.2, -0.4, 0.0], [1.0, 0.0, 9.0]], [[True, True, False], [True, True, False]])
    gate = drift_gate(logp, old, mask, unit="sequence")
    expected = torch.tensor([[1.0996679946249558, 1.0996679946249558, 0.0], [0.9003320053750442] * 2 + [0.0]],
                            dtype=torch.float64)
    torch.testing.assert_close(gate, expected, rtol=0, atol=1e-12)


def test_clip_and_residual_forms_hand_values():
    logp, old, mask = drift_inputs(TOKEN_DRIFT, [[True, True], [True, True]])
    # Clip g = [1.3448, 0.8157, 0.4947, 1.3448] to [0.6, 1.2] → [1.2, 0.8157, 0.6, 1.2]
    clipped = drift_gate(logp, old, mask, unit="token", g_min=0.6, g_max=1.2)
    expected = torch.tensor([[1.2, 0.8156651425199988], [0.6, 1.2]], dtype=torch.float64)
    torch.testing.assert_close(clipped, expected, rtol=0, atol=1e-12)
    # Residual α = 0.5: 1 + 0.5·(g − 1) = [1.1724022351, 0.9078325713, 0.7473629585, 1.1724022351]
    residual = drift_gate(logp, old, mask, unit="token", residual_alpha=0.5)
    expected = torch.tensor([[1.1724022351206869, 0.9078325712599994], [0.747362958498627, 1.1724022351206869]],
                            dtype=torch.float64)
    torch.testing.assert_close(residual, expected, rtol=0, atol=1e-12)
    # Only g_max: the lower side stays free.
    upper = drift_gate(logp, old, mask, unit="token", g_max=1.0)
    expected = torch.tensor([[1.0, 0.8156651425199988], [0.49472591699725404, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(upper, expected, rtol=0, atol=1e-12)


def test_sharpness_zero_and_no_drift_give_gate_one():
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(3, 8, generator=g, dtype=torch.float64) * 4
    mask = torch.rand(3, 8, generator=g) < 0.7
    mask[:, 0] = True
    expected = mask.to(torch.float64)
    for unit in ("token", "block", "sequence"):
        # No drift: the first use of a rollout (logp = old_logp) leaves the loss unchanged.
        torch.testing.assert_close(drift_gate(old, old, mask, unit=unit, block_size=3), expected, rtol=0, atol=0)
    logp = old + torch.randn(3, 8, generator=g, dtype=torch.float64)
    torch.testing.assert_close(drift_gate(logp, old, mask, sharpness=0.0), expected, rtol=0, atol=1e-15)


def test_block_64_on_a_64_token_response_equals_the_sequence_gate():
    g = torch.Generator().manual_seed(1)
    old = -torch.rand(3, 80, generator=g, dtype=torch.float64) * 4
    logp = old + 0.3 * torch.randn(3, 80, generator=g, dtype=torch.float64)
    mask = torch.zeros(3, 80, dtype=torch.bool)
    mask[0, :64] = True  # right-padded
    mask[1, 16:] = True  # left-padded: 64 tokens starting at 16
    mask[2, 5:69] = True  # padded on both sides
    block = drift_gate(logp, old, mask, unit="block", block_size=64)
    sequence = drift_gate(logp, old, mask, unit="sequence")
    torch.testing.assert_close(block, sequence, rtol=0, atol=1e-12)
    # and the gate really varies across rows (the check above is not trivially 1 = 1)
    assert block[0, 0] != block[1, 16]


def test_gate_is_detached():
    logp = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-1.5, -1.0, -0.5]], dtype=torch.float64)
    teacher = torch.tensor([[-0.2, -3.0, -0.5]], dtype=torch.float64, requires_grad=True)
    mask = torch.ones(1, 3, dtype=torch.bool)
    assert not drift_gate(logp, old, mask).requires_grad
    assert not drift_gate(logp, old.requires_grad_(), mask, residual_alpha=0.5).requires_grad
    assert not sign_consistency_gate(logp, teacher, torch.tensor([True]), mask, 0.5, 0.5).requires_grad


def test_masked_out_garbage_changes_nothing():
    logp, old, mask = drift_inputs(BLOCK_DRIFT, BLOCK_MASK)
    wide_logp = torch.cat([logp, torch.full((1, 4), float("inf"), dtype=torch.float64)], dim=1)
    wide_old = torch.cat([old, torch.full((1, 4), NAN, dtype=torch.float64)], dim=1)
    wide_mask = torch.cat([mask, torch.zeros(1, 4, dtype=torch.bool)], dim=1)
    # plus a fully padded row
    wide_logp = torch.cat([wide_logp, torch.full((1, 10), NAN, dtype=torch.float64)])
    wide_old = torch.cat([wide_old, torch.full((1, 10), 3.0, dtype=torch.float64)])
    wide_mask = torch.cat([wide_mask, torch.zeros(1, 10, dtype=torch.bool)])
    for agg in BLOCK_GATES:
        gate = drift_gate(logp, old, mask, block_size=2, agg=agg)
        wide = drift_gate(wide_logp, wide_old, wide_mask, block_size=2, agg=agg)
        torch.testing.assert_close(wide[:1, :6], gate, rtol=0, atol=1e-12)
        assert (wide[~wide_mask] == 0).all()


@st.composite
def drift_batches(draw):
    B, T = draw(st.integers(1, 4)), draw(st.integers(1, 12))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.floats(0.0, 5.0))
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 5
    logp = old + scale * torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) < draw(st.floats(0.2, 1.0))
    mask[draw(st.integers(0, B - 1)), draw(st.integers(0, T - 1))] = True
    span_ends = torch.rand(B, T, generator=g) < 0.3
    return logp, old, mask, span_ends


@settings(max_examples=150, deadline=None)
@given(
    drift_batches(),
    st.sampled_from(["token", "block", "span", "sequence"]),
    st.sampled_from(list(BLOCK_GATES)),
    st.integers(1, 5),
    st.floats(0.0, 4.0),
)
def test_gate_mean_over_valid_positions_is_one(batch, unit, agg, block_size, sharpness):
    logp, old, mask, span_ends = batch
    gate = drift_gate(logp, old, mask, unit, block_size, span_ends, agg, sharpness)
    assert gate[mask].mean().item() == pytest.approx(1.0, abs=1e-12)
    assert (gate[mask] > 0).all()
    assert (gate[~mask] == 0).all()
    if unit == "token" and agg != "mean":
        # Per token every aggregate is |d|: more drift never gets more weight.
        order = (logp - old)[mask].abs().argsort()
        assert (gate[mask][order].diff() <= 1e-12).all()


# ---------------------------------------------------------------- sign consistency


def test_sign_consistency_gate_hand_values():
    # teacher_logp ≥ logp → teacher direction +1: positions 0 and 2 (2 is a tie, counted as ≥).
    logp = torch.tensor([[-1.0, -2.0, -0.7, -0.1], [-1.0, -2.0, -0.7, 3.0]])
    teacher = torch.tensor([[-0.5, -3.0, -0.7, -0.2], [-0.5, -3.0, -0.7, NAN]])
    mask = torch.tensor([[True, True, True, True], [True, True, True, False]])
    correct = torch.tensor([True, False])
    gate = sign_consistency_gate(logp, teacher, correct, mask, alpha=0.5, beta=0.25)
    # row 0 correct (+1): agree at the +1 positions → 1.5, disagree → 0.25
    # row 1 wrong  (−1): agree at the −1 positions → 1.5, disagree → 0.25; padded slot → 0
    expected = torch.tensor([[1.5, 0.25, 1.5, 0.25], [0.25, 1.5, 0.25, 0.0]])
    torch.testing.assert_close(gate, expected, rtol=0, atol=0)


def test_sign_consistency_gate_dtype_follows_logp():
    logp = torch.zeros(1, 2, dtype=torch.float64)
    gate = sign_consistency_gate(logp, logp, torch.tensor([True]), torch.ones(1, 2, dtype=torch.bool), 0.1, 0.0)
    assert gate.dtype == torch.float64
    torch.testing.assert_close(gate, torch.full((1, 2), 1.1, dtype=torch.float64), rtol=0, atol=0)


# ---------------------------------------------------------------- bad input


def test_bad_input_raises_value_error():
    logp, old, mask = drift_inputs(TOKEN_DRIFT, [[True, True], [True, True]])
    with pytest.raises(ValueError, match="selects no position"):
        drift_gate(logp, old, torch.zeros(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        drift_gate(logp, old, mask.long())
    with pytest.raises(ValueError, match="old_logp"):
        drift_gate(logp, old[:, :1], mask)
    with pytest.raises(ValueError, match="non-finite"):
        drift_gate(logp, old.masked_fill(torch.tensor([[False, True], [False, False]]), NAN), mask)
    with pytest.raises(ValueError, match="span_ends"):
        drift_gate(logp, old, mask, unit="span")
    with pytest.raises(ValueError, match="span_ends"):
        drift_gate(logp, old, mask, unit="span", span_ends=torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="unit"):
        drift_gate(logp, old, mask, unit="paragraph")
    with pytest.raises(ValueError, match="agg"):
        drift_gate(logp, old, mask, agg="median")
    with pytest.raises(ValueError, match="block_size"):
        drift_gate(logp, old, mask, block_size=0)

    with pytest.raises(ValueError, match="correct"):
        sign_consistency_gate(logp, old, torch.tensor([True, False, True]), mask, 0.5, 0.5)
    with pytest.raises(ValueError, match="teacher_logp"):
        sign_consistency_gate(logp, old[:1], torch.tensor([True, False]), mask, 0.5, 0.5)
    with pytest.raises(ValueError, match="non-finite"):
        sign_consistency_gate(logp, torch.full_like(old, NAN), torch.tensor([True, False]), mask, 0.5, 0.5)


def test_sign_gate_follows_the_applied_update_on_a_reuse_step():
    """On a reuse epoch π_θ moved past π_T (log π_θ = −0.5 > log π_T = −1) while the applied update
    still pushes the token up (A = log π_T − log π_old = −1 − (−2) = +1): on a correct row the
    directions agree (1 + α), though sign(log π_T − log π_θ) would read a disagreement (β)."""
    from lit_opd.gates import SignConsistencyGate

    batch = {"old_logp": torch.tensor([[-2.0, -2.0]]), "teacher_logp": torch.tensor([[-1.0, -3.0]]),
             "correct": torch.tensor([True]), "response_mask": torch.tensor([[True, True]])}
    logp = torch.tensor([[-0.5, -2.5]])  # token 1: A = −1 (pushed down), π_θ also below π_old
    gate = SignConsistencyGate(alpha=0.5, beta=0.25)
    torch.testing.assert_close(gate(batch, logp), torch.tensor([[1.5, 0.25]]))
    current_reading = sign_consistency_gate(logp, batch["teacher_logp"], batch["correct"], batch["response_mask"],
                                            alpha=0.5, beta=0.25)
    assert current_reading[0, 0].item() == 0.25  # the reading the gate must not use
    assert gate.statistics(batch, logp)["train/sign_agree_fraction"].item() == pytest.approx(0.5)


def test_sign_agree_fraction_is_the_gates_decision_also_when_alpha_equals_one_minus_beta():
    """A decision recovered from the gate's value (g == 1 + α) miscounts when 1 + α is also a
    value a disagreement could take after composition; the statistics read the decision itself."""
    from lit_opd.gates import SignConsistencyGate

    batch = {"old_logp": torch.tensor([[-1.0, -1.0, -1.0]]), "teacher_logp": torch.tensor([[0.0, -2.0, -0.5]]),
             "correct": torch.tensor([False]), "response_mask": torch.tensor([[True, True, False]]),
             "from_teacher": torch.tensor([True])}
    stats = SignConsistencyGate(alpha=0.0, beta=0.0).statistics(batch, batch["old_logp"])
    assert stats["train/sign_agree_fraction"].item() == pytest.approx(0.5)  # token 1 agrees (down, wrong row)
    assert stats["train/teacher_rows/sign_agree_fraction"].item() == pytest.approx(0.5)


def test_drift_gate_is_finite_for_any_drift():
    """At 200 nats of drift exp(−λ·D) underflows to 0 for every unit in float32 and r / mean(r)
    would be 0/0; normalised in log space the gate is that of the same drifts shifted by 190."""
    from lit_opd.gates import DriftGate

    mask = torch.ones(2, 4, dtype=torch.bool)
    old = torch.zeros(2, 4)
    near = torch.tensor([[10.0, 10.0, 12.0, 12.0], [11.0, 11.0, 10.0, 10.0]])
    far = near + 190.0
    expected = drift_gate(near, old, mask, unit="block", block_size=2)
    torch.testing.assert_close(drift_gate(far, old, mask, unit="block", block_size=2), expected)
    gate = DriftGate(unit="block", block_size=2)({"response_mask": mask, "old_logp": old}, far)
    assert torch.isfinite(gate).all()
    torch.testing.assert_close(gate, expected)


def test_unit_statistics_weigh_the_same_drift_with_each_unit():
    # Response "ab\n\ncd" (5 character tokens, the span ends at "\n\n"), d = [0.2, −0.4, 0.3, 0, −0.3],
    # block_size 2. D per position (mean |d| over the unit):
    #   token    [0.2, 0.4, 0.3, 0, 0.3]
    #   block    {0,1} {2,3} {4}:  [0.3, 0.3, 0.15, 0.15, 0.3]
    #   span     {0,1,2} {3,4}:    [0.3, 0.3, 0.3, 0.15, 0.15]
    #   sequence 0.24 everywhere → g = 1
    # g = exp(−D) / mean(exp(−D)); the statistics are std (n − 1), min and max of g.
    from statistics import stdev

    from lit_opd.data.char_tokenizer import build_char_tokenizer
    from lit_opd.gates import DriftGate

    tokenizer = build_char_tokenizer()
    gate = DriftGate(unit="block", block_size=2, unit_statistics=True)
    gate.prepare(tokenizer)
    logp, old, mask = drift_inputs([[0.2, -0.4, 0.3, 0.0, -0.3]], [[True] * 5])
    batch = {"response_ids": torch.tensor([tokenizer("ab\n\ncd").input_ids]), "response_mask": mask, "old_logp": old}
    stats = gate.statistics(batch, logp)
    drifts = {"token": [0.2, 0.4, 0.3, 0.0, 0.3], "block": [0.3, 0.3, 0.15, 0.15, 0.3],
              "span": [0.3, 0.3, 0.3, 0.15, 0.15], "sequence": [0.24] * 5}
    for unit, drift in drifts.items():
        raw = [math.exp(-d) for d in drift]
        g = [r * len(raw) / sum(raw) for r in raw]
        expected = {"std": stdev(g), "min": min(g), "max": max(g)}
        for name, value in expected.items():
            assert stats[f"train/gate_units/{unit}/{name}"].item() == pytest.approx(value, abs=1e-12), (unit, name)
    torch.testing.assert_close(gate(batch, logp), gate.weigh(batch, logp, "block"), rtol=0, atol=0)
    assert DriftGate(unit="block").statistics(batch, logp) == {}
