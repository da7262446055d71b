"""Export the student as a plain HF checkpoint (`save_pretrained`) during and after training,
sharded or not, in the dtype of the checkpoint it started from."""

import os
from typing import Literal

import torch
from lightning.pytorch.callbacks import Callback

from lit_opd.checkpointing import checkpoint_dtype


class ExportStudent(Callback):
    """Writes `dirpath/step_<N>` every `every_n_steps` optimiser steps (None: never) and
    `dirpath/final` at the end of fit, each loadable by `AutoModelForCausalLM.from_pretrained`
    with the tokenizer beside it; dirpath None: `<trainer.log_dir>/student`. Every rank calls the
    export (it gathers sharded weights); rank 0 writes.

    dtype: of the exported weights. "original": the dtype of the student's checkpoint
    (`model.init_args.student`'s config.json; bfloat16 for Qwen3), not that of the float32 master
    weights a bf16-mixed run trains (half the size, what the student was released in); "master":
    the weights as trained."""

    def __init__(self, dirpath: str | None = None, every_n_steps: int | None = None,
                 dtype: Literal["original", "master", "float32", "bfloat16", "float16"] = "original"):
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"ExportStudent.every_n_steps must be ≥ 1 or null, got {every_n_steps}")
        self.dirpath, self.every_n_steps, self.dtype = dirpath, every_n_steps, dtype
        self._exported_step = -1

    def directory(self, trainer, name: str) -> str:
        return os.path.join(self.dirpath or os.path.join(trainer.log_dir or ".", "student"), name)

    def export_dtype(self, pl_module) -> torch.dtype | None:
        if self.dtype == "master":
            return None
        if self.dtype == "original":
            return checkpoint_dtype(pl_module.student_path)
        return getattr(torch, self.dtype)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self._exported_step:
            self._exported_step = step
            pl_module.save_student_pretrained(self.directory(trainer, f"step_{step}"), self.export_dtype(pl_module))

    def on_train_end(self, trainer, pl_module) -> None:
        pl_module.save_student_pretrained(self.directory(trainer, "final"), self.export_dtype(pl_module))
