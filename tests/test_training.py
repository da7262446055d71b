"""The training system end to end on tiny models: every variant through the CLI, the rollout
buffer's reuse and drift, one teacher scoring per rollout batch, gradient accumulation, resume."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from transformers import AutoTokenizer

from helpers_cli import OVERRIDES, fit_and_check, tiny_args
from lit_opd.cli import main
from lit_opd.data.prompts import PromptDataModule
from lit_opd.gates import DriftGate
from lit_opd.modules import OptimConfig, RolloutConfig, SampledTokenOPD
from lit_opd.rollout.scoring import score_rows

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
TRAINING_CONFIGS = [c for c in CONFIGS if c.stem not in ("eval", "defaults")]


@pytest.mark.parametrize("config", CONFIGS + sorted((ROOT / "configs" / "quickstart").glob("*.yaml")),
                         ids=lambda p: p.relative_to(ROOT / "configs").with_suffix("").as_posix())
def test_every_config_prints(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    assert "class_path: lit_opd.modules." in capsys.readouterr().out


@pytest.mark.parametrize("config", TRAINING_CONFIGS, ids=lambda p: p.stem)
def test_every_variant_fits_two_steps(config, tiny_checkpoints, prompts_file, tmp_path, monkeypatch):
    """Each variant trains: the student moves, the loss is finite, its TensorBoard tags are written."""
    monkeypatch.chdir(tmp_path)
    tags = {"train/sign_agree_fraction", "train/verifier_accuracy"} if config.stem.startswith("sg_") else ()
    fit_and_check(str(config), tiny_checkpoints, prompts_file, tmp_path / "tb", tags=tags)


class Recorder(SampledTokenOPD):
    """SampledTokenOPD that records what each step saw (test-only subclass)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records, self.teacher_calls = [], 0

    def configure_model(self):
        super().configure_model()
        self.student_calls = 0
        teacher_forward, student_forward = self.teacher.scorer.forward, self.policy.forward

        def teacher_counted(*args, **kwargs):
            self.teacher_calls += 1
            return teacher_forward(*args, **kwargs)

        def student_counted(*args, **kwargs):
            self.student_calls += 1
            return student_forward(*args, **kwargs)

        self.teacher.scorer.forward, self.policy.forward = teacher_counted, student_counted

    def log_step(self, mb, logp, gates, position_loss, reuse_index):
        drift = (logp.detach() - mb["old_logp"]).abs()[mb["response_mask"]].max().item()
        self.records.append({"step": self.global_step, "reuse": reuse_index, "drift": drift})
        super().log_step(mb, logp, gates, position_loss, reuse_index)


def make_module(checkpoints, cls=Recorder, **kwargs):
    defaults = dict(
        dtype="float32",
        rollout=RolloutConfig(num_samples=2, max_new_tokens=8, score_batch_size=64),
        optim=OptimConfig(lr=1e-2),
        gates=[DriftGate(block_size=4)],
    )
    defaults.update(kwargs)
    return cls(student=checkpoints["student"], teacher=checkpoints["teacher"], **defaults)


def make_trainer(max_steps, **kwargs):
    defaults = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False)
    defaults.update(kwargs)
    return L.Trainer(max_steps=max_steps, **defaults)


def test_reuse_drift_zero_on_first_use_and_teacher_scored_once(tiny_checkpoints, prompts_file):
    module = make_module(tiny_checkpoints, rollout=RolloutConfig(num_samples=2, max_new_tokens=8, score_batch_size=64))
    data = PromptDataModule(tiny_checkpoints["student"], prompts_file, prompts_per_rollout=2, reuse=2, num_minibatches=1)
    make_trainer(4).fit(module, data)
    assert [r["reuse"] for r in module.records] == [0, 1, 0, 1]
    assert [r["drift"] == 0.0 for r in module.records] == [True, False, True, False]
    assert module.teacher_calls == 2  # one scoring pass per rollout batch (score_batch_size ≥ rows)


@pytest.mark.parametrize("minibatches, reuse, forwards", [(1, 2, 2), (2, 1, 3)])
def test_first_step_reads_behaviour_logprobs_off_its_own_forward(minibatches, reuse, forwards, tiny_checkpoints,
                                                                 prompts_file):
    """A rollout batch's first step makes no separate behaviour-log-prob forward (one rollout batch:
    a forward per step, + one scoring pass per later mini-batch), and what it keeps for the later
    steps equals a no-grad scoring pass (lr 0: the weights stay those of the rollout)."""
    module = make_module(tiny_checkpoints, optim=OptimConfig(lr=0.0))
    data = PromptDataModule(tiny_checkpoints["student"], prompts_file, prompts_per_rollout=2, reuse=reuse,
                            num_minibatches=minibatches)
    make_trainer(minibatches * reuse).fit(module, data)
    assert module.student_calls == forwards
    for mb in module.buffer.minibatches:
        torch.testing.assert_close(mb["old_logp"], score_rows(module.policy, mb, module.collector.scoring)["logp"],
                                   atol=1e-5, rtol=1e-5)


def test_the_student_trains_in_train_mode_so_gradient_checkpointing_is_on(tiny_checkpoints, prompts_file):
    """HF checkpoints layers only in train mode, and from_pretrained returns eval mode."""
    seen = []

    class Probe(Recorder):
        def micro_step(self, *args, **kwargs):
            model = self.student.model
            seen.append((self.student.training, model.gradient_checkpointing, self.teacher.scorer.model.training))
            return super().micro_step(*args, **kwargs)

    module = make_module(tiny_checkpoints, cls=Probe, gradient_checkpointing=True)
    data = PromptDataModule(tiny_checkpoints["student"], prompts_file, prompts_per_rollout=2, reuse=1, num_minibatches=1)
    make_trainer(1).fit(module, data)
    assert seen == [(True, True, False)]


def test_teacher_with_other_vocabulary_is_refused(tiny_checkpoints, tmp_path):
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(tiny_checkpoints["teacher"])
    other.add_tokens(["<extra_token>"])
    other.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="tokenizers differ"):
        SampledTokenOPD(student=tiny_checkpoints["student"], teacher=str(tmp_path))


@pytest.mark.parametrize(("setting", "named"), [
    ("--trainer.gradient_clip_val=1.0", "model.init_args.optim.gradient_clip_val"),
    ("--trainer.accumulate_grad_batches=2", "model.init_args.micro_batch_tokens"),
])
def test_lightnings_clipping_and_accumulation_are_refused_naming_the_new_way(setting, named, tiny_checkpoints,
                                                                            prompts_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "opd", "--config", OVERRIDES, *tiny_args(tiny_checkpoints, prompts_file), setting])
    message = str(exit_info.value.code)
    assert message.startswith(f"lit-opd: error: {setting[2:].split('=')[0]}:") and named in message
    assert "\n" not in message


def test_export_student_writes_loadable_hf_checkpoints(tiny_checkpoints, prompts_file, tmp_path):
    from transformers import AutoModelForCausalLM

    from lit_opd.callbacks import ExportStudent

    module = make_module(tiny_checkpoints)
    data = PromptDataModule(tiny_checkpoints["student"], prompts_file, prompts_per_rollout=2, reuse=1)
    make_trainer(2, callbacks=[ExportStudent(str(tmp_path), every_n_steps=1)]).fit(module, data)
    assert (tmp_path / "step_1").is_dir() and (tmp_path / "step_2").is_dir()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    for name, value in module.student.state_dict().items():
        torch.testing.assert_close(exported.state_dict()[name], value, rtol=0, atol=0, msg=name)


def test_export_student_writes_the_student_s_original_dtype(tiny_checkpoints, prompts_file, tmp_path):
    """A bfloat16 student trained with float32 master weights (dtype float32) is exported in
    bfloat16 by default (its weights the trained ones, rounded), in float32 with dtype master."""
    from transformers import AutoModelForCausalLM

    from lit_opd.callbacks import ExportStudent

    bf16_student = tmp_path / "bf16_student"
    AutoModelForCausalLM.from_pretrained(tiny_checkpoints["student"], dtype=torch.bfloat16).save_pretrained(bf16_student)
    AutoTokenizer.from_pretrained(tiny_checkpoints["student"]).save_pretrained(bf16_student)
    module = make_module({**tiny_checkpoints, "student": str(bf16_student)})
    data = PromptDataModule(str(bf16_student), prompts_file, prompts_per_rollout=2, reuse=1)
    exports = [ExportStudent(str(tmp_path / "original")), ExportStudent(str(tmp_path / "master"), dtype="master")]
    make_trainer(1, callbacks=exports).fit(module, data)
    trained = module.student.state_dict()
    assert next(iter(trained.values())).dtype == torch.float32
    original = AutoModelForCausalLM.from_pretrained(tmp_path / "original" / "final")
    master = AutoModelForCausalLM.from_pretrained(tmp_path / "master" / "final")
    assert json.loads((tmp_path / "original" / "final" / "config.json").read_text())["dtype"] == "bfloat16"
    for name, value in trained.items():
        assert original.state_dict()[name].dtype == torch.bfloat16, name
        torch.testing.assert_close(original.state_dict()[name], value.to(torch.bfloat16), rtol=0, atol=0, msg=name)
        torch.testing.assert_close(master.state_dict()[name], value, rtol=0, atol=0, msg=name)


def test_validate_a_plain_hf_model_through_the_cli(tiny_checkpoints, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main([
        "validate", "--config", str(ROOT / "configs" / "eval.yaml"),
        f"--model.init_args.student={tiny_checkpoints['student']}",
        f"--data.tokenizer={tiny_checkpoints['student']}",
        "--model.init_args.dtype=float32",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        "--trainer.callbacks.benchmarks=[aime24, amc23]",
        "--trainer.callbacks.max_problems=2",
        "--trainer.callbacks.n=2",
        "--trainer.callbacks.ks=[1, 2]",
        "--trainer.callbacks.max_new_tokens=6",
        "--trainer.callbacks.progress=false",
    ])
    rows = [json.loads(line) for line in next(tmp_path.glob("runs/eval/version_0/validate_step0.jsonl")).open()]
    assert sorted({row["benchmark"] for row in rows}) == ["aime24", "amc23"] and len(rows) == 4
    assert all(row["n"] == 2 for row in rows)


def test_the_frozen_teacher_is_bfloat16_under_bf16_mixed_else_the_students_dtype():
    """A float32 config under 32-true precision (the quickstart) keeps a float32 teacher; under
    bf16-mixed the teacher computes in bfloat16 anyway and is loaded so; an explicit dtype wins."""
    from lit_opd.loading import frozen_teacher_dtype

    assert frozen_teacher_dtype(None, "float32", "bf16-mixed") == "bfloat16"
    assert frozen_teacher_dtype(None, "float32", "32-true") == "float32"
    assert frozen_teacher_dtype(None, "bfloat16", None) == "bfloat16"
    assert frozen_teacher_dtype("float32", "float32", "bf16-mixed") == "float32"
