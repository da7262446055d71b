"""A test-only callback for the resume tests, named by class_path in the YAML of a `lit-opd fit`
subprocess (tests/ is on its PYTHONPATH)."""

import io
import json
import os
import signal

import lightning as L
import torch


class StepRecorder(L.Callback):
    """Appends one JSON line per optimiser step to `path`: the global step after it, the loss, and
    where in the rollout schedule it was (rollout batch, reuse epoch, mini-batch).

    kill_while_saving_step: when the trainer writes `last.ckpt` after that global step (its second
    checkpoint of the step: ModelCheckpoint writes the top-k file, then last), write half of the
    checkpoint's bytes and SIGKILL this process: no cleanup runs, a half-written file stays.
    """

    def __init__(self, path: str, kill_while_saving_step: int | None = None):
        self.path, self.kill_while_saving_step = path, kill_while_saving_step
        self.saves_at_kill_step = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        row = {
            "step": trainer.global_step,
            "loss": float(outputs["loss"]),
            "rollout": batch["rollout_index"],
            "reuse": batch["reuse_index"],
            "minibatch": batch["minibatch_index"],
        }
        with open(self.path, "a") as handle:
            handle.write(json.dumps(row) + "\n")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if trainer.global_step != self.kill_while_saving_step:
            return
        self.saves_at_kill_step += 1
        if self.saves_at_kill_step == 2:
            torch.save = _half_then_sigkill


_real_save = torch.save


def _half_then_sigkill(obj, handle, *args, **kwargs) -> None:
    """torch.save that writes the first half of the bytes to `handle`, syncs them to disk, and
    kills the process."""
    data = io.BytesIO()
    _real_save(obj, data, *args, **kwargs)
    handle.write(data.getvalue()[: len(data.getvalue()) // 2])
    handle.flush()
    os.fsync(handle.fileno())
    os.kill(os.getpid(), signal.SIGKILL)

