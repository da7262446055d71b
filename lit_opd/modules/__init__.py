"""LightningModules: one per loss family, sharing GatedLossMixin; SFT; plain-model evaluation."""

from lit_opd.modules.gkd import GKD
from lit_opd.modules.mixin import GatedLossMixin, OptimConfig, RolloutConfig
from lit_opd.modules.opd import SampledTokenOPD
from lit_opd.modules.policy import PolicyEvaluation
from lit_opd.modules.sg_opd import SGOPD
from lit_opd.modules.topk import TeacherTopKLSM

__all__ = [
    "GKD",
    "GatedLossMixin",
    "OptimConfig",
    "PolicyEvaluation",
    "RolloutConfig",
    "SGOPD",
    "SampledTokenOPD",
    "TeacherTopKLSM",
]
