"""Sampled-token OPD: reverse KL on the student's own samples, as a per-token policy gradient."""

import lightning as L

from lit_opd.gates import Gate
from lit_opd.losses import Reduction, sampled_token_opd
from lit_opd.modules.mixin import DType, GatedLossMixin, OptimConfig, RolloutConfig


class SampledTokenOPD(GatedLossMixin, L.LightningModule):
    """ℓ_t = −ρ_t · sg(log π_T(y_t) − log π_old(y_t)), ρ_t = π_θ(y_t)/π_old(y_t), optionally
    PPO-clipped to [1 − clip_eps_low, 1 + clip_eps_high] (see `losses.sampled_token_opd`).

    Args:
        student / teacher: HF causal LM paths or hub ids; they must share a vocabulary.
        tokenizer: the tokenizer path (default: the student's); linked from data.tokenizer.
        gates: gate objects (class_path in YAML), composed by product; [] for plain OPD.
        reduction: token_mean (Σ g m ℓ / Σ m over the global batch) or sequence_mean.
        clip_eps_low / clip_eps_high: the PPO clip range of the importance ratio (None: no clip).
        chunk_size: positions per lm_head chunk (log-probs never hold [B, T, V] fp32 logits).
        shard_teacher: under a sharding strategy (FSDP2 or FSDP1), shard the frozen teacher like
            the student (True) or keep a whole copy on every rank (False).
        max_nonfinite_steps: stop after this many steps in a row skipped for non-finite values.
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
        clip_eps_low: float | None = None,
        clip_eps_high: float | None = None,
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
        if (clip_eps_low is None) != (clip_eps_high is None):
            raise ValueError("set both clip_eps_low and clip_eps_high, or neither")
        self.clip_eps = None if clip_eps_low is None else (clip_eps_low, clip_eps_high)

    def per_token_loss(self, mb, scores):
        return sampled_token_opd(scores["logp"], mb["old_logp"], mb["teacher_logp"], mb["response_mask"], self.clip_eps)
