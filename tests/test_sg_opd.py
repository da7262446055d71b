"""SG-OPD: the sign gate on hand-computed batches, the phased teacher-sampling schedule and
mixing rules, and the module end to end with the verifier in the loop."""

import json
from pathlib import Path

import pytest
import torch

from lit_opd.rollout.teacher_sampling import PhasedTeacherSampling, pair_rows, replace_responses
from helpers_cli import fit_and_check
from lit_opd.gates import sign_consistency_gate
from lit_opd.losses import topk_lsm

ROOT = Path(__file__).resolve().parents[1]


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


def test_schedule_switches_at_the_phase_starts():
    schedule = PhasedTeacherSampling([(0, 0.5), (50, 0.25), (100, 0.0)])
    assert [schedule.fraction_at(s) for s in (0, 49, 50, 99, 100, 1000)] == [0.5, 0.5, 0.25, 0.25, 0.0, 0.0]
    with pytest.raises(ValueError, match="increasing from 0"):
        PhasedTeacherSampling([(10, 0.5)])
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        PhasedTeacherSampling([(0, 1.5)])


def test_only_endorsed_teacher_rollouts_replace_students_wrong_ones_first():
    # Two chosen prompts (1 and 3 of the batch), n = 3 samples each.
    chosen = torch.tensor([1, 3])
    endorsed = torch.tensor([[False, True, False], [False, False, False]])  # prompt 3: none endorsed
    correct = torch.tensor([True] * 3 + [True, False, True] + [False] * 6)
    targets, sources = pair_rows(chosen, endorsed, correct, n=3)
    assert targets == [4]  # prompt 1's rows are 3, 4, 5; row 4 is the student's wrong one
    assert sources == [1]  # the endorsed teacher sample of the first chosen prompt
    assert pair_rows(chosen, torch.zeros(2, 3, dtype=torch.bool), correct, 3) == ([], [])


def test_replace_responses_repads_to_the_longer_response():
    rows = {
        "input_ids": torch.tensor([[9, 1, 2, 0], [9, 3, 0, 0]]),
        "attention_mask": torch.tensor([[True, True, True, False], [True, True, False, False]]),
        "response_ids": torch.tensor([[1, 2, 0], [3, 0, 0]]),
        "response_mask": torch.tensor([[True, True, False], [True, False, False]]),
    }
    out = replace_responses(rows, torch.tensor([1]), torch.tensor([[5, 6, 7, 8]]), torch.ones(1, 4, dtype=torch.bool), 0)
    assert out["response_ids"].tolist() == [[1, 2, 0, 0], [5, 6, 7, 8]]
    assert out["input_ids"].tolist() == [[9, 1, 2, 0, 0], [9, 5, 6, 7, 8]]
    assert out["attention_mask"][1].tolist() == [True] * 5


@pytest.fixture(scope="module")
def arithmetic_prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("sg") / "train.jsonl"
    with path.open("w") as handle:
        for i in range(16):
            handle.write(json.dumps({"problem": f"{i}+1", "answer": str(i + 1)}) + "\n")
    return str(path)


def test_sg_opd_with_phased_teacher_sampling_fits(tiny_checkpoints, arithmetic_prompts, tmp_path, monkeypatch):
    """SG-OPD is sampled-token OPD with the sign gate: collection verifies every row, mixes endorsed
    teacher rollouts in during the first phase, and the gate's statistics are logged."""
    monkeypatch.chdir(tmp_path)
    fit_and_check(str(ROOT / "configs" / "sg_opd.yaml"), tiny_checkpoints, arithmetic_prompts, tmp_path / "tb",
                  "--model.init_args.rollout.max_new_tokens=6",
                  "--model.init_args.rollout.teacher_phases=[[0, 1.0], [1, 0.0]]",
                  tags={"train/sign_agree_fraction", "train/verifier_accuracy", "train/teacher_rollout_fraction",
                        "train/teacher_endorsed_rate"})


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


def test_teacher_rows_are_logged_apart():
    from lit_opd.modules.step import teacher_row_logs

    mb = {"from_teacher": torch.tensor([True, False]), "response_mask": torch.tensor([[True, True], [True, False]]),
          "teacher_logp": torch.tensor([[-0.1, -0.5], [-1.0, -9.0]]), "old_logp": torch.tensor([[-9.0, -1.0], [-1.5, 0.0]])}
    gate = torch.tensor([[1.0, 2.0], [1.0, 0.0]])
    position_loss = torch.tensor([[-1.0, 0.5], [2.0, 7.0]])
    logs = teacher_row_logs(mb, gate, position_loss)
    assert logs["train/teacher_rows/fraction"].item() == pytest.approx(0.5)
    assert logs["train/teacher_rows/advantage_mean"].item() == pytest.approx((8.9 + 0.5) / 2)
    assert logs["train/teacher_rows/loss_share"].item() == pytest.approx((1.0 + 1.0) / (1.0 + 1.0 + 2.0))
    assert set(teacher_row_logs({**mb, "from_teacher": torch.tensor([False, False])}, gate, position_loss)) == {
        "train/teacher_rows/fraction"}


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
