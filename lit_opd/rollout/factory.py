"""Rollout engines and teachers built from their settings: the one module that knows every
implementation (the interfaces, `engine.RolloutEngine` and `teacher_engines.TeacherEngine`, know
none), and the only code that asks where the teacher runs."""

from typing import Literal

from lit_opd.loading import DType, load_causal_lm
from lit_opd.logprobs import CausalLMScorer
from lit_opd.rollout.engine import EngineName, HFGenerateEngine, RolloutEngine
from lit_opd.rollout.merged import MergedWeightsEngine
from lit_opd.rollout.scoring import ScoringSettings
from lit_opd.rollout.settings import RolloutConfig
from lit_opd.rollout.static_cache import StaticCacheEngine
from lit_opd.rollout.teacher_engines import ServerTeacher, TeacherEngine, TeacherServing, VLLMTeacher
from lit_opd.rollout.trainer_teacher import TrainerTeacher
from lit_opd.rollout.vllm_engine import VLLMEngine, VLLMSettings, import_vllm

TeacherPlacement = Literal["trainer", "vllm"]


def build_engine(name: EngineName, model_path: str | None = None, vllm: VLLMSettings | None = None,
                 lora: bool = False) -> RolloutEngine:
    """The rollout engine called `name`: "static" is the static-KV-cache engine (`StaticCacheEngine`, which
    falls back to HF `generate` for models it does not implement), "hf" is `HFGenerateEngine`, "vllm"
    is `VLLMEngine` built from `model_path` with `vllm` (`VLLMSettings`). For a LoRA student (`lora`)
    the static engine runs a merged copy (`MergedWeightsEngine`); HF `generate` runs PEFT's layers as
    they are, and vLLM is pushed merged weights."""
    if name == "static":
        return MergedWeightsEngine(StaticCacheEngine()) if lora else StaticCacheEngine()
    if name == "hf":
        return HFGenerateEngine()
    if name == "vllm":
        if model_path is None:
            raise ValueError("rollout.engine: vllm needs the student's model path")
        import_vllm()
        return VLLMEngine(model_path, vllm)
    raise ValueError(f"unknown rollout engine {name!r}: expected 'static', 'hf' or 'vllm'")


def check_teacher_placement(teacher_engine: TeacherPlacement, teacher_url: str | None,
                            full_logits: str | None = None) -> None:
    """Refuse settings that place the teacher twice, or outside the trainer when `full_logits`
    (the loss that reads the teacher's full logits, None: none) needs it in the trainer."""
    if teacher_url and teacher_engine != "trainer":
        raise ValueError("model.teacher_url and model.teacher_engine: vllm both place the teacher: set one")
    if full_logits and (teacher_engine != "trainer" or teacher_url):
        raise ValueError(f"{full_logits} needs the teacher's logits in the trainer: leave model.teacher_engine at "
                         f"trainer and model.teacher_url unset")


def build_teacher(
    path: str, teacher_engine: TeacherPlacement, teacher_url: str | None, serving: TeacherServing, *, dtype: DType,
    scoring: ScoringSettings, rollout: RolloutConfig, tokenizer, chunk_size: int, full_logits: str | None = None,
) -> TeacherEngine:
    """The teacher at `path` where the settings place it: a `ServerTeacher` at `teacher_url`; a
    colocated `VLLMTeacher` (teacher_engine vllm; in `dtype` unless serving.dtype says otherwise;
    vLLM missing: a one-line error naming the extra); else a `TrainerTeacher`, the frozen model in
    `dtype` (its embedding checked against `tokenizer`), generating with rollout.engine's backend,
    or the static-KV-cache engine where that is the student's vLLM engine."""
    check_teacher_placement(teacher_engine, teacher_url, full_logits)
    if teacher_url:
        return ServerTeacher(teacher_url, path, serving)
    if teacher_engine == "vllm":
        import_vllm()
        return VLLMTeacher(path, serving, scoring.top_k + len(scoring.exclude), dtype)
    model = load_causal_lm(path, dtype, "teacher", tokenizer).requires_grad_(False).eval()
    engine = build_engine("static" if rollout.engine == "vllm" else rollout.engine)
    return TrainerTeacher(CausalLMScorer(model, chunk_size), engine, scoring, rollout.generate_batch_size)
