"""Sampled-token OPD: reverse KL on the student's own samples, as a per-token policy gradient."""

from lit_opd.losses import sampled_token_opd
from lit_opd.modules.base import DistillationModule


class SampledTokenOPD(DistillationModule):
    """ℓ_t = −ρ_t · sg(log π_T(y_t) − log π_old(y_t)), ρ_t = π_θ(y_t)/π_old(y_t), optionally
    PPO-clipped to [1 − clip_eps_low, 1 + clip_eps_high] (see `losses.sampled_token_opd`).
    With `lit_opd.gates.SignConsistencyGate` among the gates this is SG-OPD (configs/sg_opd.yaml).

    Args:
        clip_eps_low / clip_eps_high: the PPO clip range of the importance ratio (None: no clip).
        **kwargs: the shared arguments of `DistillationModule` (student, teacher, rollout, gates, ...).
    """

    verdict_gates = True

    def __init__(self, *, clip_eps_low: float | None = None, clip_eps_high: float | None = None, **kwargs):
        super().__init__(**kwargs)
        if (clip_eps_low is None) != (clip_eps_high is None):
            raise ValueError("model.clip_eps_low / clip_eps_high: set both, or neither")
        self.clip_eps = None if clip_eps_low is None else (clip_eps_low, clip_eps_high)

    def per_token_loss(self, mb, scores):
        return sampled_token_opd(scores["logp"], mb["old_logp"], mb["teacher_logp"], mb["response_mask"], self.clip_eps)
