"""The rollout pipeline: collection (generate → verify → mix teacher rollouts → split → score),
phased teacher sampling, the buffer, the micro-batch cut, engines (HF `generate`, the static KV
cache, vLLM) and teachers (in the trainer, colocated vLLM, a server) behind one interface. It
never imports `lit_opd.modules`."""

from lit_opd.rollout.engine import EngineName, Generation, HFGenerateEngine, RolloutEngine, SamplingConfig
from lit_opd.rollout.factory import build_engine, build_teacher
from lit_opd.rollout.static_cache import StaticCacheEngine

__all__ = [
    "EngineName", "Generation", "HFGenerateEngine", "RolloutEngine", "SamplingConfig", "StaticCacheEngine",
    "build_engine", "build_teacher",
]
