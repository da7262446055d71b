"""Sampled-token OPD: reverse KL on the student's own samples, as a per-token policy gradient."""

import torch

from lit_opd.losses import bounded_sampled_token_opd, sampled_token_opd
from lit_opd.modules.base import DistillationModule
from lit_opd.setting_checks import check_range


class SampledTokenOPD(DistillationModule):
    """ℓ_t = −ρ_t · sg(log π_T(y_t) − log π_old(y_t)), ρ_t = π_θ(y_t)/π_old(y_t), optionally
    PPO-clipped to [1 − clip_eps_low, 1 + clip_eps_high] (see `losses.sampled_token_opd`).
    With `lit_opd.gates.SignConsistencyGate` among the gates this is SG-OPD (configs/sg_opd.yaml).

    Teacher rollouts mixed in by phased teacher sampling (rows `from_teacher`) have the student's
    behaviour log-probs, so their advantage can be several nats: on those rows the weight of the
    token's gradient is bounded, |ρ̄·Â| ≤ (1 + teacher_ratio_clip)·teacher_advantage_clip
    (`losses.bounded_sampled_token_opd`).

    Args:
        clip_eps_low: ε_lo of the PPO clip range [1 − ε_lo, 1 + ε_hi] of ρ (None: no clip; set both).
        clip_eps_high: ε_hi of that range.
        teacher_advantage_clip: c, teacher rows' A clipped to [−c, c] (None: teacher rows unbounded).
        teacher_ratio_clip: ε, teacher rows' ρ truncated to [1 − ε, 1 + ε].
        **kwargs: the shared arguments of `DistillationModule` (student, teacher, rollout, gates, ...).
    """

    verdict_gates = True

    def __init__(
        self,
        *,
        clip_eps_low: float | None = None,
        clip_eps_high: float | None = None,
        teacher_advantage_clip: float | None = 1.0,
        teacher_ratio_clip: float = 0.2,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_range("model.init_args.clip_eps_low", clip_eps_low, 0, 1, high_open=True, optional=True)
        check_range("model.init_args.clip_eps_high", clip_eps_high, 0, optional=True)
        if (clip_eps_low is None) != (clip_eps_high is None):
            raise ValueError("model.clip_eps_low / clip_eps_high: set both, or neither")
        if teacher_advantage_clip is not None and (teacher_advantage_clip <= 0 or not 0 <= teacher_ratio_clip < 1):
            raise ValueError(f"model.teacher_advantage_clip must be > 0 and model.teacher_ratio_clip in [0, 1), got "
                             f"{teacher_advantage_clip} and {teacher_ratio_clip}")
        self.clip_eps = None if clip_eps_low is None else (clip_eps_low, clip_eps_high)
        self.teacher_advantage_clip, self.teacher_ratio_clip = teacher_advantage_clip, teacher_ratio_clip

    def per_token_loss(self, mb, scores):
        args = (scores["logp"], mb["old_logp"], mb["teacher_logp"], mb["response_mask"])
        loss = sampled_token_opd(*args, self.clip_eps)
        teacher_rows = mb.get("from_teacher")
        if self.teacher_advantage_clip is None or teacher_rows is None or not teacher_rows.any():
            return loss
        bounded = bounded_sampled_token_opd(*args, self.teacher_advantage_clip, self.teacher_ratio_clip)
        return torch.where(teacher_rows[:, None], bounded, loss)
