"""SG-OPD: the sign gate on hand-computed batches, training verdicts, and the sign gate as the
top-K loss's target. Phased teacher sampling: tests/test_teacher_sampling.py."""

import pytest
import torch

from lit_opd.gates import sign_consistency_gate
from lit_opd.losses import topk_lsm


def test_sign_agreement_fraction_on_a_hand_batch():
    # Row 0 correct (s_V=+1), row 1 wrong (s_V=−1). Teacher up (≥) at: row0 t0,t2; row1 t1.
    logp = torch.tensor([[-1.0, -1.0, -2.0], [-0.5, -3.0, -1.0]])
    teacher = torch.tensor([[-0.5, -2.0, -2.0], [-1.0, -1.0, -2.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    gate = sign_consistency_gate(logp, teacher, torch.tensor([True, False]), mask, alpha=0.5, beta=0.25)
    # row0: up, down, up(equal) → agree, disagree, agree; row1: down, up → agree, disagree; t2 masked.
    expected = torch.tensor([[1.5, 0.25, 1.5], [1.5, 0.25, 0.0]])
    torch.testing.assert_close(gate, expected)
    agree = (gate == 1.5)[mask].float().mean()
    assert agree.item() == pytest.approx(3 / 5)


def test_all_correct_and_all_wrong_batches():
    logp = torch.tensor([[-1.0, -2.0]])
    teacher = torch.tensor([[-0.5, -3.0]])  # up, down
    mask = torch.ones(1, 2, dtype=torch.bool)
    correct = sign_consistency_gate(logp, teacher, torch.tensor([True]), mask, alpha=1.0, beta=0.0)
    wrong = sign_consistency_gate(logp, teacher, torch.tensor([False]), mask, alpha=1.0, beta=0.0)
    torch.testing.assert_close(correct, torch.tensor([[2.0, 0.0]]))  # keep pushing up, stop pushing down
    torch.testing.assert_close(wrong, torch.tensor([[0.0, 2.0]]))


def test_training_verdicts_need_an_end_and_a_boxed_answer(char_tokenizer):
    """A row is correct in training only if it ended (EOS) and its \\boxed{} answer is right; the
    last-number fallback comes back with rollout.answer_fallback."""
    from lit_opd.rollout.collection import RolloutCollector
    from lit_opd.rollout.factory import build_engine
    from lit_opd.rollout.scoring import ScoringSettings
    from lit_opd.rollout.settings import RolloutConfig
    from lit_opd.verify import Verifier

    texts = ["so \\boxed{12}", "so \\boxed{12} and", "so it is 12", "so \\boxed{13}"]
    ended = [True, False, True, True]
    rows = [char_tokenizer.encode(t, add_special_tokens=False) + ([char_tokenizer.eos_token_id] if e else [])
            for t, e in zip(texts, ended)]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [char_tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in rows])
    answers = ["12"] * 4
    strict, lenient = (RolloutCollector(RolloutConfig(answer_fallback=fallback), char_tokenizer, build_engine("hf"),
                                        teacher=None, scoring=ScoringSettings(), verifier=Verifier(num_workers=1))
                       for fallback in (False, True))
    try:
        assert strict.verify(ids, mask, answers).tolist() == [True, False, False, False]
        assert lenient.verify(ids, mask, answers).tolist() == [True, False, True, False]
    finally:
        strict.verifier.close()
        lenient.verifier.close()


def test_topk_lsm_takes_the_sign_gate_as_its_target_and_masks_special_tokens(tiny_checkpoints):
    """On TeacherTopKLSM the sign gate sets λ of the target p* (it does not multiply), and
    mask_special_tokens keeps every special token but the EOS ids out of the teacher's support."""
    from lit_opd.gates import DriftGate, SignConsistencyGate
    from lit_opd.modules import TeacherTopKLSM

    sign, drift = SignConsistencyGate(alpha=0.5, beta=0.25), DriftGate(unit="token")
    module = TeacherTopKLSM(student=tiny_checkpoints["student"], teacher=tiny_checkpoints["teacher"],
                            gates=[sign, drift], mask_special_tokens=True)
    assert module.support_exclude == (1, 3)  # <|im_start|>, <unk>; EOS ids 0 and 2 stay
    mask = torch.tensor([[True, True, False]])
    mb = {"response_mask": mask, "old_logp": torch.tensor([[-2.0, -2.0, 0.0]]),
          "teacher_logp": torch.tensor([[-1.0, -3.0, 0.0]]), "correct": torch.tensor([True]),
          "response_ids": torch.zeros(1, 3, dtype=torch.long),
          "teacher_topk_logp": torch.log(torch.tensor([[[0.5, 0.3], [0.2, 0.7], [0.5, 0.5]]]))}
    logp = torch.tensor([[-2.0, -2.0, 0.0]])
    gates = module.position_gates(mb, logp)
    assert len(gates) == 1  # the drift gate alone multiplies
    support_logp = torch.log(torch.tensor([[[0.1, 0.6], [0.4, 0.4], [0.5, 0.5]]]))
    loss = module.per_token_loss(mb, {"logp": logp, "support_logp": support_logp})
    expected = topk_lsm(support_logp, mb["teacher_topk_logp"], mask, target_mix=torch.tensor([[1.5, 0.25, 0.0]]))
    torch.testing.assert_close(loss, expected)
