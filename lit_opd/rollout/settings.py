"""How rollout batches are collected (`RolloutConfig`), the YAML keys `model.init_args.rollout.*`."""

from dataclasses import dataclass, field

import torch

from lit_opd.rollout.engine import EngineName, SamplingConfig
from lit_opd.rollout.teacher_engines import TeacherServing
from lit_opd.rollout.vllm_engine import VLLMSettings

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
    (`lit_opd.rollout.teacher_sampling`); empty: off.
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
        if self.generate_batch_size < 0:
            raise ValueError(f"rollout.generate_batch_size must be ≥ 0 (0: all rows at once), got {self.generate_batch_size}")

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.max_new_tokens, self.temperature, self.top_p, self.top_k)


# Hyperparameters of modules built in Python hold these; checkpoints load with weights_only=True.
torch.serialization.add_safe_globals([RolloutConfig, VLLMSettings, TeacherServing])
