"""The typed settings every distillation module shares: the weights' dtype, how rollouts are
collected (`RolloutConfig`) and the optimiser (`OptimConfig`). LightningCLI turns them into the
YAML keys `model.init_args.dtype`, `model.init_args.rollout.*` and `model.init_args.optim.*`."""

from dataclasses import dataclass, field
from typing import Literal

import torch

from lit_opd.rollout.engine import EngineName, SamplingConfig
from lit_opd.rollout.teacher_engines import TeacherServing
from lit_opd.rollout.vllm_engine import VLLMSettings
from lit_opd.setting_checks import check_optim_settings, check_rollout_settings

DType = Literal["float32", "bfloat16", "float16"]


def frozen_teacher_dtype(teacher_dtype: DType | None, dtype: DType, precision: str | None) -> DType:
    """The frozen teacher's dtype: `teacher_dtype` if set; else bfloat16 under bf16-mixed precision,
    which computes the teacher in bfloat16 anyway (a float32 copy would only double its memory);
    else the student's `dtype`."""
    if teacher_dtype is not None:
        return teacher_dtype
    return "bfloat16" if precision is not None and str(precision).startswith("bf16") else dtype


@dataclass
class RolloutConfig:
    """How a rollout batch is collected.

    num_samples responses per prompt, sampled with temperature (0: greedy), top_p and top_k
    (0: off), at most max_new_tokens each, by `engine` ("static": the static-KV-cache engine,
    which falls back to "hf" where unsupported; "hf": HF `generate`; "vllm": vLLM in the training
    process with the student's live weights, set by `vllm`), at most generate_batch_size rows per
    engine call (0: every row of the rollout batch at once; the KV cache grows with it; vllm pages
    its cache and takes every row). score_batch_size: rows per no-grad forward when scoring a
    rollout batch without a micro_batch_tokens budget.

    Verifier verdicts (`correct` per row, `math-verify`, verify_timeout seconds per check) are
    computed when a gate needs them, when teacher_phases is set, or when verify is true (then
    only logged: train/verifier_accuracy). A row is correct only if it ended (an EOS id, not cut
    at max_new_tokens) and its final answer, in \\boxed{}, equals the reference; answer_fallback
    also takes the last number of a response without a box as its answer (as evaluation does). teacher_phases: phased teacher sampling, a schedule of
    [start step, fraction] phases from step 0, e.g. [[0, 0.5], [50, 0.25], [100, 0.0]]
    (`lit_opd.modules.teacher_sampling`); empty: off.
    """

    num_samples: int = 8
    max_new_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    engine: EngineName = "static"
    generate_batch_size: int = 0
    vllm: VLLMSettings = field(default_factory=VLLMSettings)
    score_batch_size: int = 64
    verify: bool = False
    verify_timeout: float = 5.0
    answer_fallback: bool = False
    teacher_phases: list[tuple[int, float]] = field(default_factory=list)

    def __post_init__(self):
        check_rollout_settings(self)

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.max_new_tokens, self.temperature, self.top_p, self.top_k)


@dataclass
class OptimConfig:
    """AdamW with linear warm-up to a constant learning rate; gradient_clip_val: clip the
    gradients' global norm before each optimiser step (None: no clipping). lit_opd optimises
    manually (micro-batches by token budget), so clipping is set here, not on the trainer."""

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


# Hyperparameters of modules built in Python hold these; checkpoints load with weights_only=True.
torch.serialization.add_safe_globals([RolloutConfig, OptimConfig, VLLMSettings, TeacherServing])
