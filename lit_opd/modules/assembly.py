"""What a distillation module runs on, built in its `configure_model`: the student, the teacher
where the settings place it (`factory.build_teacher`), both laid out for a sharding strategy, and
the rollout collector over the student's engine, the teacher, the scoring settings and a verifier."""

from functools import partial

from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

from lit_opd.loading import frozen_teacher_dtype, load_causal_lm
from lit_opd.logprobs import CausalLMScorer
from lit_opd.modules.state import drop_teacher_keys
from lit_opd.rollout.collection import RolloutCollector
from lit_opd.rollout.factory import build_engine, build_teacher
from lit_opd.rollout.scoring import ScoringSettings
from lit_opd.rollout.teacher_engines import TeacherEngine
from lit_opd.sharding import place_scorer
from lit_opd.verify import Verifier, available_cpus


def assemble(module) -> tuple[CausalLMScorer, TeacherEngine, RolloutCollector]:
    """(student scorer, teacher, rollout collector) of the `DistillationModule` `module`. Under a
    sharding strategy (FSDP2 or FSDP1) the student is sharded, the teacher sharded like it or
    replicated (`shard_teacher`), and the module's checkpoints hold no teacher keys."""
    student = load_causal_lm(module.student_path, module.dtype_name, "student", module.tokenizer)
    if module.gradient_checkpointing:
        student.gradient_checkpointing_enable()
    student.train()  # from_pretrained returns eval mode, in which HF skips gradient checkpointing
    policy = CausalLMScorer(student, module.chunk_size)
    trainer = module._trainer
    scoring = ScoringSettings(module.teacher_top_k, tuple(module.support_exclude), module.micro_batch_tokens,
                              module.rollout.score_batch_size)
    teacher = build_teacher(
        module.teacher_path, module.teacher_engine, module.teacher_url, module.teacher_serving, scoring=scoring,
        dtype=frozen_teacher_dtype(module.teacher_dtype_name, module.dtype_name, trainer and trainer.precision),
        rollout=module.rollout, tokenizer=module.tokenizer, chunk_size=module.chunk_size,
        full_logits=module.full_teacher_logits)
    if trainer is not None and isinstance(trainer.strategy, (ModelParallelStrategy, FSDPStrategy)):
        if module.rollout.engine == "vllm" and isinstance(trainer.strategy, FSDPStrategy):
            raise ValueError("rollout.engine: vllm takes the student's weights from FSDP2, not FSDPStrategy (FSDP1): "
                             "use ModelParallelStrategy (configs/strategies/fsdp2.yaml)")
        policy = place_scorer(module, policy)
        teacher.distribute(partial(place_scorer, module, shard=module.shard_teacher))
        # Sharded checkpoints load exactly the keys of the module's state dict, and checkpoints
        # hold no teacher (it is frozen and reloaded from model.teacher).
        module.register_state_dict_post_hook(drop_teacher_keys)
    engine = build_engine(module.rollout.engine, module.student_path, module.rollout.vllm)
    return policy, teacher, RolloutCollector(module.rollout, module.tokenizer, engine, teacher, scoring,
                                             verdict_verifier(module))


def verdict_verifier(module) -> Verifier | None:
    """The verifier of the rollout rows' verdicts where a gate, rollout.verify or phased teacher
    sampling needs them (None: no verdicts); its workers share this rank's CPUs."""
    rollout = module.rollout
    if not (any(gate.needs_verdicts for gate in module.gates) or rollout.verify or rollout.teacher_phases):
        return None
    devices = module._trainer.num_devices if module._trainer is not None else 1
    return Verifier(num_workers=max(1, available_cpus() // max(devices, 1)), timeout=rollout.verify_timeout)
