"""Rollout engines (HF `generate`, the fast static-KV-cache engine) and the rollout buffer."""

from lit_opd.rollout.engine import Generation, HFGenerateEngine, RolloutEngine, SamplingConfig
from lit_opd.rollout.fast import StaticCacheEngine

__all__ = ["Generation", "HFGenerateEngine", "RolloutEngine", "SamplingConfig", "StaticCacheEngine"]
