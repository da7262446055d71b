"""Teacher-TopK / local support matching (LSM): a dense divergence on the teacher's top-K."""

from typing import Literal

import lightning as L

from lit_opd.gates import Gate
from lit_opd.losses import Reduction, topk_lsm
from lit_opd.modules.mixin import DType, GatedLossMixin, OptimConfig, RolloutConfig


class TeacherTopKLSM(GatedLossMixin, L.LightningModule):
    """ℓ_t = KL(p̂_θ ‖ p̂_T) on the teacher's top-K support S_t (renormalised, or with a tail
    bucket), or forward KL / JSD(β) (see `losses.topk_lsm`). The teacher's top-K ids and
    log-probs are computed once per rollout batch; the gradient flows through the student's
    logits on S_t (no score function).

    Args (beyond SampledTokenOPD's): top_k: support size K (32, as in the LSM paper);
    divergence, tail, beta: as `losses.topk_lsm`.
    """

    def __init__(
        self,
        student: str,
        teacher: str,
        tokenizer: str | None = None,
        dtype: DType = "bfloat16",
        rollout: RolloutConfig = RolloutConfig(),
        optim: OptimConfig = OptimConfig(),
        gates: list[Gate] | None = None,
        reduction: Reduction = "token_mean",
        top_k: int = 32,
        divergence: Literal["reverse_kl", "forward_kl", "jsd"] = "reverse_kl",
        tail: bool = False,
        beta: float = 0.5,
        chunk_size: int = 1024,
        gradient_checkpointing: bool = False,
        shard_teacher: bool = True,
        max_nonfinite_steps: int = 5,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["gates"])
        self.init_distillation(student, teacher, tokenizer, dtype, rollout, optim, gates, reduction, chunk_size,
                               gradient_checkpointing, max_nonfinite_steps, seed, shard_teacher=shard_teacher)
        if top_k < 1:
            raise ValueError(f"model.top_k must be ≥ 1, got {top_k}")
        self.teacher_top_k, self.divergence, self.tail, self.beta = top_k, divergence, tail, beta

    def per_token_loss(self, mb, scores):
        return topk_lsm(scores["support_logp"], mb["teacher_topk_logp"], mb["response_mask"],
                        self.divergence, self.tail, self.beta)
