"""Phased teacher sampling (SG-OPD's cold start): the schedule, the mixing rules, teacher rows
logged apart, teacher rollouts from the teacher's own generation path, and SG-OPD end to end."""

from pathlib import Path

import pytest
import torch

from helpers_cli import fit_and_check
from lit_opd.logprobs import CausalLMScorer
from lit_opd.rollout.collection import RolloutCollector
from lit_opd.rollout.engine import Generation, HFGenerateEngine
from lit_opd.rollout.scoring import ScoringSettings
from lit_opd.rollout.settings import RolloutConfig
from lit_opd.rollout.teacher_engines import TeacherEngine
from lit_opd.rollout.teacher_sampling import PhasedTeacherSampling, pair_rows, replace_responses
from lit_opd.verify import Verifier

ROOT = Path(__file__).resolve().parents[1]


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


def test_sg_opd_with_phased_teacher_sampling_fits(tiny_checkpoints, write_prompts, tmp_path, monkeypatch):
    """SG-OPD is sampled-token OPD with the sign gate: collection verifies every row, mixes endorsed
    teacher rollouts in during the first phase, and the gate's statistics are logged."""
    monkeypatch.chdir(tmp_path)
    prompts = write_prompts(range(16), lambda i: f"{i}+1", lambda i: i + 1)
    fit_and_check(str(ROOT / "configs" / "sg_opd.yaml"), tiny_checkpoints, prompts, tmp_path / "tb",
                  "--model.init_args.rollout.max_new_tokens=6",
                  "--model.init_args.rollout.teacher_phases=[[0, 1.0], [1, 0.0]]",
                  tags={"train/sign_agree_fraction", "train/verifier_accuracy", "train/teacher_rollout_fraction",
                        "train/teacher_endorsed_rate"})


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


class ScriptedTeacher(TeacherEngine):
    """A teacher outside the trainer whose every rollout is `response` (token ids, then EOS)."""

    def __init__(self, response: list[int]):
        self.response, self.generated_rows = response, []

    def score(self, rows, top_k, exclude):
        return {"logp": torch.zeros(rows["response_ids"].shape)}

    def generate(self, prompt_ids, prompt_mask, sampling, eos_token_ids, pad_token_id, generator):
        self.generated_rows.append(prompt_ids.shape[0])
        ids = torch.tensor([self.response]).repeat(prompt_ids.shape[0], 1)
        return Generation(ids, torch.ones_like(ids, dtype=torch.bool))


class StudentEngine(HFGenerateEngine):
    """HF `generate` that records the model of each call."""

    def __init__(self):
        self.models = []

    def generate(self, model, prompt_ids, *args):
        self.models.append(model)
        return super().generate(model, prompt_ids, *args)


def test_teacher_rollouts_come_from_the_teacher_never_from_the_students_engine(tiny_lm, char_tokenizer):
    """With every prompt sent to the teacher (fraction 1.0), its endorsed rollouts replace the
    student's; the student's engine ran once, on the student, and the teacher generated its rows."""
    texts, n = ["1+1=?", "0+2=?"], 2
    rows = [char_tokenizer.encode(t, add_special_tokens=False) for t in texts]
    batch = {"prompt_ids": torch.tensor(rows), "prompt_mask": torch.ones(2, len(rows[0]), dtype=torch.bool),
             "answers": ["2", "2"], "num_minibatches": 1}
    answer = char_tokenizer.encode("\\boxed{2}", add_special_tokens=False) + [char_tokenizer.eos_token_id]
    engine, teacher = StudentEngine(), ScriptedTeacher(answer)
    collector = RolloutCollector(RolloutConfig(num_samples=n, max_new_tokens=4, teacher_phases=[(0, 1.0)]),
                                 char_tokenizer, engine, teacher, ScoringSettings(), Verifier(num_workers=1))
    policy = CausalLMScorer(tiny_lm)
    try:
        [mb], stats = collector.collect(batch, 0, policy, torch.Generator().manual_seed(0))
    finally:
        collector.close()
    assert engine.models == [policy.model] and teacher.generated_rows == [len(texts) * n]
    assert stats["train/teacher_mixed_fraction"] == 1.0 and mb["from_teacher"].all()
    assert mb["response_ids"].tolist() == [answer] * (len(texts) * n)


def test_the_teacher_in_the_trainer_generates_with_its_own_engine(tiny_checkpoints, char_tokenizer):
    """The in-trainer teacher is a module with an engine of its own; beside the student's vLLM
    engine it generates with the static-KV-cache engine, never through the student's vLLM."""
    from torch import nn

    from lit_opd.rollout.factory import build_teacher
    from lit_opd.rollout.static_cache import StaticCacheEngine
    from lit_opd.rollout.teacher_engines import TeacherServing

    for engine, expected in (("hf", HFGenerateEngine), ("static", StaticCacheEngine), ("vllm", StaticCacheEngine)):
        teacher = build_teacher(tiny_checkpoints["teacher"], "trainer", None, TeacherServing(), dtype="float32",
                                scoring=ScoringSettings(), rollout=RolloutConfig(engine=engine), tokenizer=char_tokenizer,
                                chunk_size=64)
        assert isinstance(teacher, nn.Module) and type(teacher.engine) is expected
