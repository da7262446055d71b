"""Teacher-TopK / local support matching (LSM): a dense divergence on the teacher's top-K."""

from typing import Literal

from lit_opd.losses import topk_lsm
from lit_opd.modules.base import DistillationModule


class TeacherTopKLSM(DistillationModule):
    """ℓ_t = KL(p̂_θ ‖ p̂_T) on the teacher's top-K support S_t (renormalised, or with a tail
    bucket), or forward KL / JSD(β) (see `losses.topk_lsm`). The teacher's top-K ids and
    log-probs are computed once per rollout batch; the gradient flows through the student's
    logits on S_t (no score function).

    Args:
        top_k: support size K (32, as in the LSM paper).
        divergence, tail, beta: as `losses.topk_lsm` (beta is the JSD β).
        **kwargs: the shared arguments of `DistillationModule` (student, teacher, rollout, gates, ...).
    """

    def __init__(
        self,
        *,
        top_k: int = 32,
        divergence: Literal["reverse_kl", "forward_kl", "jsd"] = "reverse_kl",
        tail: bool = False,
        beta: float = 0.5,
        **kwargs,
    ):
        if top_k < 1:
            raise ValueError(f"model.top_k must be ≥ 1, got {top_k}")
        super().__init__(**kwargs)
        self.teacher_top_k, self.divergence, self.tail, self.beta = top_k, divergence, tail, beta

    def per_token_loss(self, mb, scores):
        return topk_lsm(scores["support_logp"], mb["teacher_topk_logp"], mb["response_mask"],
                        self.divergence, self.tail, self.beta)
