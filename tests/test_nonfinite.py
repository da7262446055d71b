"""No silent NaNs. NaN logits of the teacher or the student, a NaN loss or NaN gradients are caught
at the step where they appear: the step is skipped (the weights and the optimiser's moments do not
move) with a warning that names the source, `train/nonfinite_skipped` counts it, and
`max_nonfinite_steps` skipped steps in a row stop the run with a clear error."""

import contextlib
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_opd.data.prompts import PromptDataModule
from lit_opd.modules import OptimConfig, RolloutConfig, SampledTokenOPD

# data.reuse 2, one mini-batch: rollout batch 1 is optimiser steps 3 and 4 (global_step 2 and 3
# while they run). Those are the steps the injections hit.
POISONED_STEPS = {2, 3}


@contextlib.contextmanager
def nan_hidden_states(scorer):
    """NaN final hidden states of `scorer`'s model, so NaN logits; an `nn.Module` forward hook
    keeps the autograd graph whole."""

    def poison(module, inputs, output):
        return output * float("nan")

    handle = scorer.model.base_model.norm.register_forward_hook(poison)
    try:
        yield
    finally:
        handle.remove()


class Poisoned(SampledTokenOPD):
    """Injects non-finite values at `poison`: "teacher" (NaN logits while rollout batch 1 is
    scored), "student" (NaN logits in the training forward), "loss" (a NaN position loss) or
    "gradients" (a position loss of √|x − sg(x)|: value 0, gradient NaN) at the steps in `steps`."""

    def __init__(self, *, poison: str, steps: set[int], **kwargs):
        super().__init__(**kwargs)
        self.poison, self.steps = poison, steps

    def fill_buffer(self, batch):
        hit = self.poison == "teacher" and batch["rollout_index"] == 1
        with nan_hidden_states(self.teacher.scorer) if hit else contextlib.nullcontext():
            super().fill_buffer(batch)

    def student_scores(self, mb):
        hit = self.poison == "student" and self.global_step in self.steps
        with nan_hidden_states(self.policy) if hit else contextlib.nullcontext():
            return super().student_scores(mb)

    def per_token_loss(self, mb, scores):
        loss = super().per_token_loss(mb, scores)
        if self.global_step not in self.steps:
            return loss
        if self.poison == "loss":
            return loss.masked_fill(mb["response_mask"], float("nan"))
        if self.poison == "gradients":
            return loss + (scores["logp"] - scores["logp"].detach()).abs().sqrt()
        return loss


class WeightsPerStep(L.Callback):
    """The student's weights after every optimiser step."""

    def __init__(self):
        self.weights = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append([p.detach().clone() for p in pl_module.policy.parameters()])


def fit(checkpoints, prompts_file, poison, steps, max_steps=6, max_nonfinite_steps=3):
    module = Poisoned(
        student=checkpoints["student"], teacher=checkpoints["teacher"], dtype="float32", poison=poison, steps=steps,
        rollout=RolloutConfig(num_samples=2, max_new_tokens=8), optim=OptimConfig(lr=1e-2),
        max_nonfinite_steps=max_nonfinite_steps,
    )
    data = PromptDataModule(checkpoints["student"], prompts_file, instruction="", prompts_per_rollout=2, reuse=2)
    recorder = WeightsPerStep()
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[recorder])
    return module, trainer, data, recorder


@pytest.fixture(scope="module")
def prompts_file(write_prompts):
    return write_prompts(range(12))


@pytest.mark.parametrize(
    ("poison", "warning"),
    [
        ("teacher", r"non-finite teacher log-probs \(rollout batch 1, mini-batch 0\)"),
        # the first step's behaviour log-probs are its own forward's: non-finite with it
        ("student", r"non-finite student log-probs and behavior log-probs \(rollout batch 1, mini-batch 0\)"),
        ("loss", r"non-finite loss \(rollout batch 1, mini-batch 0\)"),
        ("gradients", r"non-finite gradients at optimiser step 2"),
    ],
)
def test_nonfinite_steps_are_skipped_counted_and_training_goes_on(poison, warning, tiny_checkpoints, prompts_file):
    module, trainer, data, recorder = fit(tiny_checkpoints, prompts_file, poison, POISONED_STEPS)
    with pytest.warns(UserWarning, match=warning) as warned:
        trainer.fit(module, data)
    assert sum("skipping this step" in str(w.message) for w in warned) == 2
    assert trainer.global_step == 6
    assert trainer.callback_metrics["train/nonfinite_skipped"].item() == 2.0
    assert module.guard.in_a_row == 0

    weights = recorder.weights  # after steps 1..6
    moved = [not all(torch.equal(a, b) for a, b in zip(before, after)) for before, after in zip(weights, weights[1:])]
    assert moved == [True, False, False, True, True]  # steps 3 and 4 left the weights as step 2 did
    optimizer = trainer.optimizers[0]
    assert {int(state["step"]) for state in optimizer.state.values()} == {4}  # Adam's moments moved 4 times, not 6
    assert all(torch.isfinite(w).all() for w in weights[-1])


@pytest.mark.parametrize(("poison", "last"), [("student", "student log-probs"), ("gradients", "gradients")])
def test_too_many_nonfinite_steps_in_a_row_stop_the_run(poison, last, tiny_checkpoints, prompts_file):
    module, trainer, data, recorder = fit(tiny_checkpoints, prompts_file, poison, set(range(2, 100)),
                                         max_nonfinite_steps=2)
    with pytest.warns(UserWarning, match="skipping this step"):
        with pytest.raises(RuntimeError, match=rf"2 steps in a row skipped for non-finite values, the last: "
                           rf"non-finite {last} .*model.max_nonfinite_steps=2.*stopping the run"):
            trainer.fit(module, data)
    assert module.guard.skipped == 2
    assert len(recorder.weights) == 3  # steps 1, 2 and the skipped step 3; step 4 raised
    assert all(torch.equal(a, b) for a, b in zip(recorder.weights[1], recorder.weights[2]))
