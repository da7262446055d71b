"""LightningModules: `DistillationModule` (the shared loop) and one subclass per loss family;
SFT; plain-model evaluation."""

from lit_opd.modules.base import DistillationModule
from lit_opd.modules.gkd import GKD
from lit_opd.modules.opd import SampledTokenOPD
from lit_opd.modules.policy import PolicyEvaluation
from lit_opd.modules.optim import OptimConfig
from lit_opd.rollout.settings import RolloutConfig
from lit_opd.modules.topk import TeacherTopKLSM

__all__ = [
    "GKD",
    "DistillationModule",
    "OptimConfig",
    "PolicyEvaluation",
    "RolloutConfig",
    "SampledTokenOPD",
    "TeacherTopKLSM",
]
