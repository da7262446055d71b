"""Teacher-TopK / local support matching (LSM): a dense divergence on the teacher's top-K."""

from typing import Literal

from lit_opd.data.templates import eos_token_ids
from lit_opd.gates import SignConsistencyGate
from lit_opd.losses import topk_lsm
from lit_opd.modules.base import DistillationModule
from lit_opd.loading import check_top_k_fits
from lit_opd.setting_checks import check_range


class TeacherTopKLSM(DistillationModule):
    """ℓ_t = KL(p̂_θ ‖ p̂_T) on the teacher's top-K support S_t (renormalised, or with a tail
    bucket), or forward KL / JSD(β) (see `losses.topk_lsm`). The teacher's top-K ids and
    log-probs are computed once per rollout batch; the gradient flows through the student's
    logits on S_t (no score function).

    With `lit_opd.gates.SignConsistencyGate` among the gates this is SG-OPD on the top-K loss:
    the target becomes p* ∝ exp((1 − λ)·sg(log p̂_θ) + λ·log p̂_T) on S_t, λ = 1 + α where the
    teacher's direction agrees with the verifier's and β where not (configs/sg_topk_lsm.yaml);
    the other gates multiply as usual.

    Args:
        top_k: support size K (32, as in the LSM paper).
        divergence, tail, beta: as `losses.topk_lsm` (beta is the JSD β).
        mask_special_tokens: the tokenizer's special tokens other than the EOS ids leave the
            teacher's support (before renormalising; their mass joins the tail bucket), as the LSM
            paper masks them. The EOS ids stay, or the student could not learn to stop.
        **kwargs: the shared arguments of `DistillationModule` (student, teacher, rollout, gates, ...).
    """

    verdict_gates = True

    def __init__(
        self,
        *,
        top_k: int = 32,
        divergence: Literal["reverse_kl", "forward_kl", "jsd"] = "reverse_kl",
        tail: bool = False,
        beta: float = 0.5,
        mask_special_tokens: bool = False,
        **kwargs,
    ):
        check_range("model.init_args.top_k", top_k, 1)
        check_range("model.init_args.beta", beta, 0, 1)
        super().__init__(**kwargs)
        self.teacher_top_k, self.divergence, self.tail, self.beta = top_k, divergence, tail, beta
        if mask_special_tokens:
            self.support_exclude = tuple(sorted(set(self.tokenizer.all_special_ids) - set(eos_token_ids(self.tokenizer))))
        check_top_k_fits(top_k, len(self.support_exclude), self.tokenizer, self.student_path, self.teacher_path)
        self.sign_gate = next((g for g in self.gates if isinstance(g, SignConsistencyGate)), None)

    def position_gates(self, mb, logp):
        return [gate(mb, logp) for gate in self.gates if gate is not self.sign_gate]

    def per_token_loss(self, mb, scores):
        target_mix = None if self.sign_gate is None else self.sign_gate(mb, scores["logp"])
        return topk_lsm(scores["support_logp"], mb["teacher_topk_logp"], mb["response_mask"],
                        self.divergence, self.tail, self.beta, target_mix)
