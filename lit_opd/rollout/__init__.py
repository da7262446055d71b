"""Rollout engines (HF `generate`, the fast built-in engine) and the rollout buffer."""

from lit_opd.rollout.engine import Generation, HFGenerateEngine, RolloutEngine, SamplingConfig

__all__ = ["Generation", "HFGenerateEngine", "RolloutEngine", "SamplingConfig"]
