"""SG-OPD: sampled-token OPD with the sign-consistency gate, the verifier in the loop."""

import lightning as L

from lit_opd.gates import Gate, SignConsistencyGate
from lit_opd.losses import Reduction, sampled_token_opd
from lit_opd.modules.mixin import DType, GatedLossMixin, OptimConfig, RolloutConfig, masked_mean


class SGOPD(GatedLossMixin, L.LightningModule):
    """Every rollout is verified against its prompt's reference answer; the position loss of
    sampled-token OPD is gated by g_t = 1 + alpha where the teacher's direction
    sign(log π_T − log π_θ) agrees with the verifier's (+1 correct, −1 wrong), beta where not.
    `gates` adds more gates (e.g. the Block64 drift gate), composed by product. Phased teacher
    sampling (cold start) is the PhasedTeacherSampling callback.

    Args (beyond SampledTokenOPD's): alpha ≥ 0, 0 ≤ beta < 1 of the sign gate; verify_timeout:
    seconds per answer check (a check that runs over counts as wrong).
    """

    needs_verdicts = True

    def __init__(
        self,
        student: str,
        teacher: str,
        tokenizer: str | None = None,
        dtype: DType = "bfloat16",
        rollout: RolloutConfig = RolloutConfig(),
        optim: OptimConfig = OptimConfig(),
        alpha: float = 0.5,
        beta: float = 0.5,
        gates: list[Gate] | None = None,
        reduction: Reduction = "token_mean",
        clip_eps_low: float | None = None,
        clip_eps_high: float | None = None,
        verify_timeout: float = 5.0,
        chunk_size: int = 1024,
        gradient_checkpointing: bool = False,
        shard_teacher: bool = True,
        max_nonfinite_steps: int = 5,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["gates"])
        self.sign_gate = SignConsistencyGate(alpha, beta)
        self.init_distillation(student, teacher, tokenizer, dtype, rollout, optim, [self.sign_gate, *(gates or [])],
                               reduction, chunk_size, gradient_checkpointing, max_nonfinite_steps, seed, verify_timeout,
                               shard_teacher=shard_teacher)
        if (clip_eps_low is None) != (clip_eps_high is None):
            raise ValueError("set both clip_eps_low and clip_eps_high, or neither")
        self.clip_eps = None if clip_eps_low is None else (clip_eps_low, clip_eps_high)

    def per_token_loss(self, mb, scores):
        return sampled_token_opd(scores["logp"], mb["old_logp"], mb["teacher_logp"], mb["response_mask"], self.clip_eps)

    def log_training(self, mb, scores, gates, position_loss, reuse_index) -> None:
        super().log_training(mb, scores, gates, position_loss, reuse_index)
        agree = gates[0] == 1.0 + self.sign_gate.alpha
        self.log("train/sign_agree_fraction", masked_mean(agree.float(), mb["response_mask"]))
