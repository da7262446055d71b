"""Exact resume. A run killed with SIGKILL in the middle of a rollout batch's reuse steps (while it
writes a checkpoint, even) resumes from `--ckpt_path last` and continues bit for bit like the run
that was never killed; a half-written checkpoint is never `last`; a resume whose settings would
misread the checkpoint's rollout buffer is refused before any model loads."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from helpers_cli import closed_port
from lit_opd.checkpointing import AtomicCheckpointIO, atomic_save, find_last_checkpoint, gather_rank_states
from lit_opd.cli import main
from lit_opd.data.prompts import PromptDataModule
from lit_opd.gates import DriftGate
from lit_opd.modules import OptimConfig, RolloutConfig, SampledTokenOPD, TeacherTopKLSM
from lit_opd.rollout.teacher_engines import TeacherServing, TeacherUnreachable

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS = 6
# data.reuse 2 × data.num_minibatches 2: rollout batch 0 is steps 1-4, rollout batch 1 steps 5-8.
# The killed run dies while writing last.ckpt of step 4, so last.ckpt holds step 3: the second
# reuse epoch of rollout batch 0 is half done, and step 4 must come from the restored buffer.
KILL_WHILE_SAVING_STEP = 4


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_inputs")
    with (root / "train.jsonl").open("w") as handle:
        for i in range(24):
            handle.write(json.dumps({"problem": f"{i}+{i + 1}=?", "answer": str(2 * i + 1)}) + "\n")
    with (root / "bench.jsonl").open("w") as handle:
        handle.write(json.dumps({"id": "a", "problem": "1+1=?", "answer": "2"}) + "\n")
        handle.write(json.dumps({"id": "b", "problem": "2+3=?", "answer": "5"}) + "\n")
    return root


def sg_opd_config(checkpoints, inputs, runs: Path) -> dict:
    """SG-OPD on the tiny models (verifier verdicts and teacher rollouts in the buffer, a teacher
    phase change at step 4), Block drift gate, pass@k every 2 steps, a checkpoint every step."""
    return {
        "seed_everything": 0,
        "trainer": {
            "max_steps": MAX_STEPS, "accelerator": "cpu", "devices": 1, "precision": "32-true",
            "deterministic": True, "enable_progress_bar": False, "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(runs), "name": "resume"}},
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"save_last": True, "every_n_train_steps": 1}},
                {"class_path": "lit_opd.callbacks.PassAtKEvaluation",
                 "init_args": {"benchmarks": [str(inputs / "bench.jsonl")], "n": 2, "ks": [1],
                               "max_new_tokens": 8, "every_n_steps": 2, "verify_workers": 1, "progress": False}},
            ],
        },
        "model": {
            "class_path": "lit_opd.modules.SampledTokenOPD",
            "init_args": {
                "student": checkpoints["student"], "teacher": checkpoints["teacher"], "dtype": "float32",
                "rollout": {"num_samples": 2, "max_new_tokens": 8, "teacher_phases": [[0, 0.5], [4, 0.0]],
                            "engine": "static"},
                "optim": {"lr": 1e-2},
                "gates": [{"class_path": "lit_opd.gates.SignConsistencyGate"},
                          {"class_path": "lit_opd.gates.DriftGate", "init_args": {"block_size": 4}}],
            },
        },
        "data": {
            "tokenizer": checkpoints["student"], "train_data": str(inputs / "train.jsonl"),
            "prompt_field": "problem", "answer_field": "answer", "problem_format": "as_is", "instruction": "", "max_prompt_length": 64,
            "prompts_per_rollout": 2, "reuse": 2, "num_minibatches": 2,
        },
    }


def write_config(config: dict, path: Path) -> str:
    path.write_text(yaml.safe_dump(config))
    return str(path)


def lit_opd_fit(config: str, *args: str) -> subprocess.Popen:
    """`python cli.py fit --config config args...` in a fresh process: one thread, so that every
    run does the same floating-point operations in the same order; tests/ on the path for the
    StepRecorder callback."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "tests"), HF_HUB_OFFLINE="1")
    command = [sys.executable, str(ROOT / "cli.py"), "fit", "--config", config, *args]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def recorder(path: Path, *extra: str) -> list[str]:
    return ["--trainer.callbacks+=helpers_resume.StepRecorder", f"--trainer.callbacks.path={path}", *extra]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_sigkill_mid_reuse_then_resume_is_bitwise_equal(tiny_checkpoints, inputs, tmp_path):
    """An uninterrupted run and a killed one side by side, then `--ckpt_path last`: the losses of
    the steps after the checkpoint, the final weights, Adam's moments and the pass@k history are
    equal, bit for bit (CPU, one thread, deterministic algorithms)."""
    config = sg_opd_config(tiny_checkpoints, inputs, tmp_path / "runs")
    straight_config = write_config(sg_opd_config(tiny_checkpoints, inputs, tmp_path / "straight"), tmp_path / "a.yaml")
    killed_config = write_config(config, tmp_path / "b.yaml")

    kill = f"--trainer.callbacks.kill_while_saving_step={KILL_WHILE_SAVING_STEP}"
    straight = lit_opd_fit(straight_config, *recorder(tmp_path / "straight.jsonl"))
    killed = lit_opd_fit(killed_config, *recorder(tmp_path / "killed.jsonl", kill))
    straight_log, killed_log = straight.communicate()[0], killed.communicate()[0]
    assert straight.returncode == 0, straight_log[-3000:]
    assert killed.returncode == -9, killed_log[-3000:]

    run_dir = tmp_path / "runs" / "resume" / "version_0"
    checkpoints = run_dir / "checkpoints"
    # Killed halfway through writing last.ckpt of step 4: the half lies in a .partial file, and
    # last.ckpt is still the whole checkpoint of step 3, in the middle of the reuse epochs.
    [partial] = checkpoints.glob(".last.ckpt.*.partial")
    assert partial.stat().st_size > 0
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        AtomicCheckpointIO().load_checkpoint(partial)
    at_kill = torch.load(checkpoints / "last.ckpt", weights_only=False)
    assert at_kill["global_step"] == KILL_WHILE_SAVING_STEP - 1
    [rank_state] = at_kill["lit_opd"]["ranks"]
    assert rank_state["buffer"]["rollout_index"] == 0 and rank_state["generator"] is not None
    assert {"response_ids", "response_mask", "old_logp", "teacher_logp", "correct", "from_teacher"} <= set(
        rank_state["buffer"]["minibatches"][1])
    killed_steps = read_jsonl(tmp_path / "killed.jsonl")
    assert [(r["step"], r["rollout"], r["reuse"]) for r in killed_steps] == [(1, 0, 0), (2, 0, 0), (3, 0, 1), (4, 0, 1)]
    config_digest = digest(run_dir / "config.yaml")

    resumed = lit_opd_fit(killed_config, *recorder(tmp_path / "resumed.jsonl"), "--ckpt_path", "last")
    resumed_log = resumed.communicate()[0]
    assert resumed.returncode == 0, resumed_log[-3000:]

    # The resumed run redoes step 4 from the restored buffer, then generates rollout batch 1 from
    # the restored generator in the new teacher phase: every loss equals the uninterrupted run's.
    straight_steps, resumed_steps = read_jsonl(tmp_path / "straight.jsonl"), read_jsonl(tmp_path / "resumed.jsonl")
    assert [r["step"] for r in straight_steps] == list(range(1, MAX_STEPS + 1))
    assert resumed_steps == straight_steps[KILL_WHILE_SAVING_STEP - 1 :]
    assert killed_steps == straight_steps[:KILL_WHILE_SAVING_STEP]

    final_straight = torch.load(tmp_path / "straight" / "resume" / "version_0" / "checkpoints" / "last.ckpt",
                                weights_only=False)
    final_resumed = torch.load(checkpoints / "last.ckpt", weights_only=False)
    assert final_resumed["global_step"] == final_straight["global_step"] == MAX_STEPS
    assert final_resumed["state_dict"].keys() == final_straight["state_dict"].keys()
    for name, weight in final_straight["state_dict"].items():
        assert torch.equal(final_resumed["state_dict"][name], weight), name
    for a, b in zip(final_straight["optimizer_states"][0]["state"].values(),
                    final_resumed["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(a[key], b[key]) for key in a)

    def history(checkpoint):
        [entries] = [v["history"] for k, v in checkpoint["callbacks"].items() if "PassAtKEvaluation" in k]
        return [(e["step"], {m: v for m, v in e["metrics"].items() if m != "eval/seconds"}) for e in entries]

    assert [step for step, _ in history(final_resumed)] == [2, 4, 6]
    assert history(final_resumed) == history(final_straight)

    # It went on in the killed run's directory, beside its untouched config, and cleaned up.
    assert not (tmp_path / "runs" / "resume" / "version_1").exists()
    assert digest(run_dir / "config.yaml") == config_digest
    assert (run_dir / "config_resume_step3.yaml").is_file()
    assert not list(checkpoints.glob("*.partial"))


class Losses(L.Callback):
    """(global step, rollout batch, reuse epoch, mini-batch, loss) of every micro-step."""

    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append((trainer.global_step, batch["rollout_index"], batch["reuse_index"],
                          batch["minibatch_index"], float(outputs["loss"])))


def python_api_fit(checkpoints, inputs, out: Path, max_steps: int, ckpt_path=None, micro_batch_tokens: int = 0,
                   teacher_url: str | None = None, optim: OptimConfig = OptimConfig(lr=1e-2),
                   saver: ModelCheckpoint | None = None, checkpointing: bool = True):
    """SampledTokenOPD with a Block gate, 2 rollout batches per epoch of 4 optimiser steps each
    (reuse 2 × 2 mini-batches): an epoch is 8 optimiser steps. `saver` (default: a checkpoint
    after every step in `out`); `checkpointing` false: none. Returns the micro-steps' losses and the
    checkpoint of `max_steps` (None without checkpointing)."""
    module = SampledTokenOPD(student=checkpoints["student"], teacher=checkpoints["teacher"], dtype="float32",
                             rollout=RolloutConfig(num_samples=2, max_new_tokens=8), optim=optim,
                             gates=[DriftGate(block_size=4)], micro_batch_tokens=micro_batch_tokens,
                             teacher_url=teacher_url, teacher_serving=TeacherServing(retries=2, backoff_s=0.01))
    data = PromptDataModule(checkpoints["student"], str(inputs / "train.jsonl"), instruction="", max_prompts=4,
                            prompts_per_rollout=2, reuse=2, num_minibatches=2)
    losses = Losses()
    saver = saver or ModelCheckpoint(dirpath=out, every_n_train_steps=1, save_top_k=-1)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, enable_checkpointing=checkpointing,
                        deterministic=True, plugins=[AtomicCheckpointIO()],
                        callbacks=[losses, saver] if checkpointing else [losses])
    trainer.fit(module, data, ckpt_path=ckpt_path)
    if not checkpointing:
        return losses.rows, None
    [last] = [path for path in out.glob("*.ckpt") if torch.load(path, weights_only=False)["global_step"] == max_steps][:1]
    return losses.rows, torch.load(last, weights_only=False)


@pytest.fixture(scope="module")
def straight_python_api_run(tiny_checkpoints, inputs, tmp_path_factory):
    """Ten uninterrupted steps, a checkpoint after each: (losses, final checkpoint, directory)."""
    out = tmp_path_factory.mktemp("straight_api")
    return *python_api_fit(tiny_checkpoints, inputs, out, max_steps=10), out


@pytest.mark.parametrize("resume_after", [7, 8], ids=["mid_epoch_mid_reuse", "at_epoch_end"])
def test_resume_across_an_epoch_end(straight_python_api_run, resume_after, tiny_checkpoints, inputs, tmp_path):
    """Trainer.fit(ckpt_path=...) from the checkpoint of step 7 (second reuse epoch of a rollout
    batch) or 8 (the last step of the data epoch) continues like the uninterrupted run."""
    straight_rows, straight_final, straight_dir = straight_python_api_run
    [path] = straight_dir.glob(f"*step={resume_after}.ckpt")
    rows, final = python_api_fit(tiny_checkpoints, inputs, tmp_path / "resumed", max_steps=10, ckpt_path=path)
    assert rows == straight_rows[resume_after:]
    assert [r[1] for r in straight_rows] == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]  # epoch 2 starts at rollout 2
    for name, weight in straight_final["state_dict"].items():
        assert torch.equal(final["state_dict"][name], weight), name


def test_a_run_resumes_with_a_smaller_micro_batch_budget(straight_python_api_run, tiny_checkpoints, inputs, tmp_path):
    """micro_batch_tokens is not part of the resume layout: a run that ran out of memory resumes from
    its checkpoint with a smaller budget and continues (its numbers those of the uncut run to float32
    rounding: the objective does not depend on the cut)."""
    straight_rows, straight_final, straight_dir = straight_python_api_run
    [path] = straight_dir.glob("*step=7.ckpt")
    rows, final = python_api_fit(tiny_checkpoints, inputs, tmp_path / "resumed", max_steps=8, ckpt_path=path,
                                 micro_batch_tokens=64)
    assert [row[:4] for row in rows] == [row[:4] for row in straight_rows[7:8]]
    assert rows[0][4] == pytest.approx(straight_rows[7][4], rel=1e-5)
    [straight_step8] = straight_dir.glob("*step=8.ckpt")
    expected = torch.load(straight_step8, weights_only=False)["state_dict"]
    for name, weight in expected.items():
        torch.testing.assert_close(final["state_dict"][name], weight, rtol=1e-4, atol=1e-5, msg=name)


def test_an_unreachable_teacher_server_stops_the_run_after_a_checkpoint_that_loses_nothing(
        straight_python_api_run, tiny_checkpoints, inputs, tmp_path):
    """Resumed at step 4 (it opens rollout batch 1) with a teacher server that refuses connections:
    the run stops with a one-line error naming the server and the checkpoint it wrote, after its
    retries; that checkpoint, resumed with the teacher back, continues like the uninterrupted run
    (the rollouts drawn before the failure are drawn again)."""
    straight_rows, straight_final, straight_dir = straight_python_api_run
    [step4] = straight_dir.glob("*step=4.ckpt")
    url = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(TeacherUnreachable) as error:
        python_api_fit(tiny_checkpoints, inputs, tmp_path / "stopped", max_steps=10, ckpt_path=step4, teacher_url=url)
    message = str(error.value)
    assert "\n" not in message and url in message and "3 tries" in message and "--ckpt_path last" in message
    written = tmp_path / "stopped" / "last.ckpt"
    assert str(written) in message and torch.load(written, weights_only=False)["global_step"] == 4
    rows, final = python_api_fit(tiny_checkpoints, inputs, tmp_path / "resumed", max_steps=10, ckpt_path=written)
    assert rows == straight_rows[4:]
    for name, weight in straight_final["state_dict"].items():
        assert torch.equal(final["state_dict"][name], weight), name


def test_with_checkpointing_off_a_teacher_failure_says_nothing_was_written(straight_python_api_run,
                                                                           tiny_checkpoints, inputs, tmp_path):
    _, _, straight_dir = straight_python_api_run
    [step4] = straight_dir.glob("*step=4.ckpt")
    url = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(TeacherUnreachable) as error:
        python_api_fit(tiny_checkpoints, inputs, tmp_path / "stopped", max_steps=10, ckpt_path=step4, teacher_url=url,
                       checkpointing=False)
    message = str(error.value)
    assert "nothing was written (trainer.enable_checkpointing is false)" in message
    assert "wrote" not in message and "--ckpt_path last" not in message and "\n" not in message
    assert not (tmp_path / "stopped").exists()


def test_the_last_step_is_saved_at_the_end_of_a_fit(straight_python_api_run, tiny_checkpoints, inputs, tmp_path):
    """max_steps 8 with a checkpoint every 3 steps: last.ckpt holds step 8 (the run's own weights),
    and resuming from it to step 10 continues like the uninterrupted run."""
    straight_rows, straight_final, straight_dir = straight_python_api_run
    saver = ModelCheckpoint(dirpath=tmp_path / "every3", every_n_train_steps=3, save_last=True)
    python_api_fit(tiny_checkpoints, inputs, tmp_path / "every3", max_steps=8, saver=saver)
    last = torch.load(tmp_path / "every3" / "last.ckpt", weights_only=False)
    [step8] = straight_dir.glob("*step=8.ckpt")
    assert last["global_step"] == 8
    for name, weight in torch.load(step8, weights_only=False)["state_dict"].items():
        assert torch.equal(last["state_dict"][name], weight), name
    rows, final = python_api_fit(tiny_checkpoints, inputs, tmp_path / "resumed", max_steps=10,
                                 ckpt_path=tmp_path / "every3" / "last.ckpt")
    assert rows == straight_rows[8:]
    for name, weight in straight_final["state_dict"].items():
        assert torch.equal(final["state_dict"][name], weight), name


def test_a_resume_optimises_with_the_command_s_settings(straight_python_api_run, tiny_checkpoints, inputs, tmp_path):
    """Resumed at step 7 with lr 0.5 (the checkpoint's: 0.01), weight decay 0 and other betas:
    the optimiser takes the command's values, keeps Adam's moments, and the step's update is
    0.5 / 0.01 = 50 times the uninterrupted run's (AdamW's update is linear in lr); resumed with the
    checkpoint's own settings nothing changes, bit for bit (test_resume_across_an_epoch_end)."""
    _, _, straight_dir = straight_python_api_run
    [step7], [step8] = straight_dir.glob("*step=7.ckpt"), straight_dir.glob("*step=8.ckpt")
    at7, at8 = (torch.load(path, weights_only=False) for path in (step7, step8))
    _, final = python_api_fit(tiny_checkpoints, inputs, tmp_path / "resumed", max_steps=8, ckpt_path=step7,
                              optim=OptimConfig(lr=0.5, betas=(0.9, 0.999)))
    [group] = final["optimizer_states"][0]["param_groups"]
    assert (group["lr"], group["initial_lr"], final["lr_schedulers"][0]["base_lrs"]) == (0.5, 0.5, [0.5])
    for name, before in at7["state_dict"].items():
        straight_update, update = at8["state_dict"][name] - before, final["state_dict"][name] - before
        torch.testing.assert_close(update, 50 * straight_update, rtol=1e-3, atol=1e-6, msg=name)
    _, final = python_api_fit(tiny_checkpoints, inputs, tmp_path / "betas", max_steps=8, ckpt_path=step7,
                              optim=OptimConfig(lr=1e-2, weight_decay=0.1, betas=(0.5, 0.9)))
    [group] = final["optimizer_states"][0]["param_groups"]
    assert (group["lr"], group["weight_decay"], tuple(group["betas"])) == (1e-2, 0.1, (0.5, 0.9))


# ----------------------------------------------------------------------- atomic writes
def test_a_save_that_dies_midway_leaves_last_whole(tmp_path, monkeypatch):
    last = tmp_path / "last.ckpt"
    atomic_save({"global_step": 3, "weight": torch.arange(4.0)}, last)
    before = digest(last)

    def dies_midway(obj, handle):
        handle.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint({"global_step": 4}, last)
    monkeypatch.undo()
    assert digest(last) == before
    assert AtomicCheckpointIO().load_checkpoint(last)["global_step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_partial_files_of_killed_writers_are_never_last(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    atomic_save({"global_step": 3}, checkpoints / "last.ckpt")
    stale = checkpoints / ".last.ckpt.12345.partial"
    stale.write_bytes(b"PK\x03\x04 what a SIGKILL left")
    os.utime(stale, (4e9, 4e9))  # newer than last.ckpt

    trainer = L.Trainer(logger=False, callbacks=[ModelCheckpoint(dirpath=checkpoints, save_last=True)])
    assert find_last_checkpoint(trainer, continue_run=True) == str(checkpoints / "last.ckpt")
    assert trainer.checkpoint_callback._find_last_checkpoints(trainer) == {str(checkpoints / "last.ckpt")}
    atomic_save({"global_step": 4}, checkpoints / "last.ckpt")
    assert not stale.exists()

    torn = checkpoints / "torn.ckpt"
    torn.write_bytes(b"PK\x03\x04 the first bytes of a checkpoint")
    with pytest.raises(ValueError, match="torn.ckpt: not a readable checkpoint"):
        AtomicCheckpointIO().load_checkpoint(torn)


# ------------------------------------------------------------------ refused resumes
@pytest.fixture(scope="module")
def one_step_run(tiny_checkpoints, inputs, tmp_path_factory):
    """A finished 2-step run of the SG-OPD config (no evaluation): its runs directory and config."""
    root = tmp_path_factory.mktemp("one_step_run")
    config = sg_opd_config(tiny_checkpoints, inputs, root / "runs")
    config["trainer"]["max_steps"] = 2
    config["trainer"]["callbacks"] = config["trainer"]["callbacks"][:2]
    path = write_config(config, root / "config.yaml")
    main(["fit", "--config", path])
    return root, path


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fails the test if a model is loaded (the refusal must come before any long work)."""

    def refuse(path, dtype, role, tokenizer=None):
        raise AssertionError(f"model.{role} was loaded before the resume was refused")

    monkeypatch.setattr("lit_opd.modules.assembly.load_causal_lm", refuse)  # the student
    monkeypatch.setattr("lit_opd.rollout.factory.load_causal_lm", refuse)  # the teacher in the trainer


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("--data.reuse=3", "data.reuse is 3 here but 2 in the checkpoint"),
        ("--data.num_minibatches=1", "data.num_minibatches is 1 here but 2"),
        ("--model.init_args.rollout.num_samples=4", "model.init_args.rollout.num_samples is 4 here but 2"),
        ("TEACHER", "model.init_args.teacher is"),
        ("STUDENT", "model.init_args.student (hidden size, layers, vocabulary rows) is (48, 2, "),
    ],
)
def test_resume_with_settings_that_break_the_buffer_is_refused(one_step_run, override, named, tmp_path,
                                                                tiny_checkpoints, no_model_loads):
    root, config = one_step_run
    if override == "TEACHER":  # the same weights and vocabulary, but another teacher as far as anyone knows
        other = shutil.copytree(tiny_checkpoints["teacher"], tmp_path / "other_teacher")
        override = f"--model.init_args.teacher={other}"
    if override == "STUDENT":  # another shape: the teacher's (width 48, not 32) as the student
        override = f"--model.init_args.student={tiny_checkpoints['teacher']}"
    run_dir = root / "runs" / "resume" / "version_0"
    before = {p: digest(p) for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", config, override, "--trainer.max_steps=4", "--ckpt_path", "last"])
    message = str(exit_info.value.code)
    assert message.startswith("lit-opd: error: cannot resume from") and "\n" not in message
    assert named in message and str(run_dir / "checkpoints" / "last.ckpt") in message
    assert {p: digest(p) for p in run_dir.rglob("*") if p.is_file()} == before
    assert not (root / "runs" / "resume" / "version_1").exists()


def test_a_resume_that_adds_a_sign_gate_to_a_buffer_without_verdicts_is_refused(tiny_checkpoints, inputs, tmp_path,
                                                                                 monkeypatch):
    """Stopped mid-way through a rollout batch collected without verifier verdicts (no sign gate,
    no teacher phases), resumed with a SignConsistencyGate, which reads them: refused in one line
    before any model loads (it was `KeyError: 'correct'` at the first step)."""
    config = sg_opd_config(tiny_checkpoints, inputs, tmp_path / "runs")
    config["trainer"].update(max_steps=2, callbacks=config["trainer"]["callbacks"][:1])
    config["model"]["init_args"]["rollout"].pop("teacher_phases")
    config["model"]["init_args"]["gates"] = config["model"]["init_args"]["gates"][1:]  # the drift gate alone
    path = write_config(config, tmp_path / "config.yaml")
    main(["fit", "--config", path])
    for where in ("lit_opd.modules.assembly.load_causal_lm", "lit_opd.rollout.factory.load_causal_lm"):
        monkeypatch.setattr(where, lambda *args: pytest.fail("a model was loaded"))
    sign_and_drift = json.dumps([{"class_path": "lit_opd.gates.SignConsistencyGate"},
                                 {"class_path": "lit_opd.gates.DriftGate", "init_args": {"block_size": 4}}])
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", path, f"--model.init_args.gates={sign_and_drift}", "--trainer.max_steps=4",
              "--ckpt_path", "last"])
    message = str(exit_info.value.code)
    assert message.startswith("lit-opd: error: cannot resume from") and "\n" not in message
    assert "model.init_args.gates has SignConsistencyGate, which reads verifier verdicts" in message


def test_resume_through_the_python_api_is_refused_too(one_step_run, tiny_checkpoints, inputs):
    """Trainer.fit(ckpt_path=...) without the CLI: the module's on_load_checkpoint refuses."""
    root, _ = one_step_run
    module = TeacherTopKLSM(student=tiny_checkpoints["student"], teacher=tiny_checkpoints["teacher"], dtype="float32",
                            rollout=RolloutConfig(num_samples=2, max_new_tokens=8), optim=OptimConfig(lr=1e-2))
    data = PromptDataModule(tiny_checkpoints["student"], str(inputs / "train.jsonl"), prompt_field="problem",
                            instruction="", prompts_per_rollout=2, reuse=3, num_minibatches=2)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    with pytest.raises(ValueError, match="model.class_path is .*TeacherTopKLSM.* here but .*SampledTokenOPD.*; data.reuse is 3"):
        trainer.fit(module, data, ckpt_path=root / "runs" / "resume" / "version_0" / "checkpoints" / "last.ckpt")


# ---------------------------------------------------------------------------- ranks
def gather_on_rank(rank: int, world: int, init_file: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    states = gather_rank_states({"rank": rank, "generator": torch.Generator().manual_seed(rank).get_state()})
    torch.save(states, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def test_every_rank_state_reaches_the_checkpoint(tmp_path):
    """Rank 0 alone writes the checkpoint, so each rank's buffer and generator are gathered there."""
    # fork: the children need no re-import of this module (seconds of imports under spawn)
    torch.multiprocessing.start_processes(gather_on_rank, args=(2, tmp_path / "init", tmp_path / "states"),
                                          nprocs=2, start_method="fork")
    states = torch.load(tmp_path / "states.0", weights_only=False)
    assert [s["rank"] for s in states] == [0, 1]
    assert not torch.equal(states[0]["generator"], states[1]["generator"])
    assert torch.load(tmp_path / "states.1", weights_only=False) is None
    assert gather_rank_states({"rank": 0}) == [{"rank": 0}]


def test_a_trainer_built_in_python_gets_atomic_sharded_saves_too():
    """`lit-opd` makes the strategy's sharded saves atomic when it builds the trainer; a trainer built
    in Python gets the same from the callback every distillation module brings (only the class
    changes: the strategy's settings stay)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lit_opd.checkpointing import AtomicModelParallelStrategy, ResumableCheckpoints

    strategy = ModelParallelStrategy(process_group_backend="gloo", save_distributed_checkpoint=False)
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=strategy, logger=False)
    ResumableCheckpoints().setup(trainer, None, "fit")
    assert type(trainer.strategy) is AtomicModelParallelStrategy and trainer.strategy is strategy
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert not trainer.strategy.writes_directory()
