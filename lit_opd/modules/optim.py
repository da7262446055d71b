"""The optimiser settings (`OptimConfig`), the YAML keys `model.init_args.optim.*`."""

from dataclasses import dataclass

import torch

from lit_opd.setting_checks import check_optim_settings


@dataclass
class OptimConfig:
    """AdamW with linear warm-up to a constant learning rate. lit_opd optimises manually
    (micro-batches by token budget), so gradient clipping is set here, not on the trainer.

    Args:
        lr: the learning rate after warm-up.
        weight_decay: AdamW's decoupled weight decay.
        betas: AdamW's (β1, β2).
        warmup_steps: optimiser steps of linear warm-up from lr/(warmup_steps + 1) to lr.
        gradient_clip_val: clip the gradients' global norm to this before each step (None: no clipping).
    """

    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    gradient_clip_val: float | None = None

    def __post_init__(self):
        check_optim_settings(self)

    def build(self, params) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
        """(AdamW over `params`, its per-step schedule: lr·min(1, (step + 1) / (warmup_steps + 1)))."""
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay, betas=tuple(self.betas))
        warmup = max(self.warmup_steps, 0)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)))


# Hyperparameters of modules built in Python hold it; checkpoints load with weights_only=True.
torch.serialization.add_safe_globals([OptimConfig])
