"""SG-OPD: the sign gate on hand-computed batches, the phased teacher-sampling schedule and
mixing rules, and the module end to end with the verifier in the loop."""

import json
from pathlib import Path

import pytest
import torch

from lit_opd.modules.teacher_sampling import PhasedTeacherSampling, pair_rows, replace_responses
from helpers_cli import fit_and_check
from lit_opd.gates import sign_consistency_gate

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
