"""How rollout batches are collected (`RolloutConfig`), the YAML keys `model.init_args.rollout.*`."""

from dataclasses import dataclass, field

import torch

from lit_opd.rollout.engine import EngineName, SamplingConfig
from lit_opd.rollout.teacher_engines import TeacherServing
from lit_opd.rollout.vllm_engine import VLLMSettings
from lit_opd.setting_checks import check_rollout_settings


@dataclass
class RolloutConfig:
    """How a rollout batch is collected. Verifier verdicts (`correct` per row) are computed when a
    gate needs them, when teacher_phases is set, or when verify is true; a row is correct only if
    it ended (an EOS id, not cut at max_new_tokens) and its final answer equals the reference.

    Args:
        num_samples: responses sampled per prompt.
        max_new_tokens: the most tokens of one response.
        temperature: the sampling temperature (0: greedy).
        top_p: nucleus sampling's probability mass (1: off).
        top_k: sample among the k most likely tokens (0: off).
        engine: the rollout engine: "static" (static KV cache; HF `generate` where unsupported),
            "hf" (HF `generate`) or "vllm" (vLLM in the training process, the student's live weights).
        generate_batch_size: the most rows per engine call (0: every row at once; vllm takes every row,
            but with a teacher server it generates parts of this size, each scored while the rest generate).
        vllm: the vllm engine's settings (`VLLMSettings`).
        score_batch_size: rows per no-grad scoring forward without a micro_batch_tokens budget.
        verify: verify every row even when nothing needs verdicts (logged: train/verifier_accuracy).
        verify_timeout: seconds one `math-verify` check may take (a hung check counts as wrong).
        answer_fallback: take the last number of a response without a \\boxed{} answer as its answer.
        teacher_phases: phased teacher sampling, [start step, fraction of prompts] phases from step
            0, e.g. [[0, 0.5], [50, 0.25], [100, 0.0]] (`rollout.teacher_sampling`); empty: off.
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


# Hyperparameters of modules built in Python hold these; checkpoints load with weights_only=True.
torch.serialization.add_safe_globals([RolloutConfig, VLLMSettings, TeacherServing])
