"""Rollout engines (HF `generate`, the static-KV-cache engine) and the rollout buffer."""

from lit_opd.rollout.engine import EngineName, Generation, HFGenerateEngine, RolloutEngine, SamplingConfig
from lit_opd.rollout.engine import build_engine
from lit_opd.rollout.static_cache import StaticCacheEngine

__all__ = [
    "EngineName", "Generation", "HFGenerateEngine", "RolloutEngine", "SamplingConfig", "StaticCacheEngine", "build_engine"
]
