"""What a distillation module is made of (`DistillationSetup`, the base of `DistillationModule`):
its settings, the student, the teacher where the settings place it (`factory.build_teacher`),
both laid out for a sharding strategy, the rollout collector over the student's engine, the
teacher, the scoring settings and a verifier (`assemble`), and what its checkpoints hold."""

from functools import partial

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

from lit_opd.checkpointing import ResumableCheckpoints
from lit_opd.data.templates import PromptTemplate, datamodule_template
from lit_opd.gates import Gate
from lit_opd.loading import DType, check_same_vocabulary, frozen_teacher_dtype, load_causal_lm, load_tokenizer
from lit_opd.logprobs import CausalLMScorer
from lit_opd.losses import Reduction
from lit_opd.modules.optim import OptimConfig
from lit_opd.modules.state import CommandOptimiserSettings, drop_teacher_keys, restore_training_state, training_state
from lit_opd.modules.step import NonfiniteGuard
from lit_opd.rollout.buffer import RolloutBuffer
from lit_opd.rollout.collection import RolloutCollector
from lit_opd.rollout.engine import Generation, SamplingConfig
from lit_opd.rollout.factory import TeacherPlacement, build_engine, build_teacher, check_teacher_placement
from lit_opd.rollout.scoring import ScoringSettings
from lit_opd.rollout.settings import RolloutConfig
from lit_opd.rollout.teacher_engines import TeacherEngine, TeacherServing
from lit_opd.rollout.vllm_engine import require_vllm
from lit_opd.setting_checks import check_step_settings
from lit_opd.sharding import place_scorer, save_pretrained_full
from lit_opd.verify import Verifier, available_cpus


class DistillationSetup(L.LightningModule):
    """What every distillation module is made of: its settings (the CLI's `model.init_args.*`),
    the student, the teacher wherever it runs and the rollout collector (built in
    `configure_model` by `assemble`), and what its checkpoints hold. `DistillationModule` adds
    the optimiser step. A variant sets `teacher_top_k` (the support size the teacher's scoring
    returns, 0 for none; `support_exclude`: ids never in it); gates that need verifier verdicts
    (the sign gate) are defined for variants with `verdict_gates` only; a loss that reads the
    teacher's full logits names itself in `full_teacher_logits` (the teacher then stays in the trainer).

    Args:
        student: the student, an HF causal LM path or hub id.
        teacher: the teacher, an HF causal LM path or hub id sharing the student's vocabulary.
        tokenizer: the tokenizer path (default: the student's); linked from data.tokenizer.
        dtype: the student's weights' dtype (under bf16-mixed, keep float32 master weights).
        teacher_dtype: the frozen teacher's weights' dtype (None: bfloat16 under bf16-mixed
            precision, which computes in bfloat16 anyway, else `dtype`; `loading.frozen_teacher_dtype`).
        teacher_engine: where the teacher runs: "trainer" (a frozen HF model beside the student) or
            "vllm" (a colocated vLLM engine: scoring from its prompt log-probs; the teacher's weights
            never enter the trainer's memory).
        teacher_url: a vLLM OpenAI-compatible server that serves the teacher (e.g. `vllm serve
            <teacher> --max-logprobs 64`); scoring and teacher rollouts go there. A server that stays
            unreachable stops the run with a one-line error after writing a checkpoint.
        teacher_serving: the colocated engine's and the server client's settings (`TeacherServing`).
        rollout: how rollout batches are collected (`RolloutConfig`).
        optim: AdamW and its warm-up (`OptimConfig`).
        gates: gate objects (class_path in YAML), composed by product; [] for none.
        reduction: token_mean (Σ g m ℓ / Σ m over the global batch) or sequence_mean.
        micro_batch_tokens: the padded tokens of one forward and backward (0: a whole mini-batch
            at once): each optimiser step's mini-batch is cut into micro-batches within it
            (`micro_batches.cut_rows`); teacher scoring and behaviour log-probs use it too. The
            objective does not depend on the cut, so a run may resume with another budget.
        chunk_size: positions per lm_head chunk (log-probs never hold [B, T, V] fp32 logits).
        gradient_checkpointing: recompute the student's layer activations in the backward.
        shard_teacher: under a sharding strategy (FSDP2 or FSDP1), shard the frozen teacher like
            the student (True) or keep a whole copy on every rank (False).
        max_nonfinite_steps: stop after this many steps in a row skipped for non-finite values.
        seed: the sampling seed (rank r draws from seed·1000003 + r).
    """

    teacher_top_k: int = 0
    support_exclude: tuple[int, ...] = ()
    verdict_gates: bool = False
    full_teacher_logits: str | None = None

    def __init__(
        self,
        student: str,
        teacher: str,
        tokenizer: str | None = None,
        dtype: DType = "bfloat16",
        teacher_dtype: DType | None = None,
        teacher_engine: TeacherPlacement = "trainer",
        teacher_url: str | None = None,
        teacher_serving: TeacherServing = TeacherServing(),
        rollout: RolloutConfig = RolloutConfig(),
        optim: OptimConfig = OptimConfig(),
        gates: list[Gate] | None = None,
        reduction: Reduction = "token_mean",
        micro_batch_tokens: int = 0,
        chunk_size: int = 1024,
        gradient_checkpointing: bool = False,
        shard_teacher: bool = True,
        max_nonfinite_steps: int = 5,
        seed: int = 0,
    ):
        super().__init__()
        check_step_settings(chunk_size, micro_batch_tokens, max_nonfinite_steps)
        self.save_hyperparameters(ignore=["gates"])
        check_teacher_placement(teacher_engine, teacher_url, self.full_teacher_logits)
        self.student_path, self.teacher_path, self.dtype_name, self.teacher_dtype_name = student, teacher, dtype, teacher_dtype
        self.teacher_engine, self.teacher_url, self.teacher_serving = teacher_engine, teacher_url, teacher_serving
        require_vllm(rollout.engine)
        self.tokenizer = load_tokenizer(tokenizer or student, "tokenizer")
        check_same_vocabulary(self.tokenizer, load_tokenizer(teacher, "teacher"), student, teacher)
        self.rollout, self.optim, self.reduction, self.seed = rollout, optim, reduction, seed
        self.micro_batch_tokens, self.chunk_size = micro_batch_tokens, chunk_size
        self.gradient_checkpointing, self.shard_teacher = gradient_checkpointing, shard_teacher
        self.automatic_optimization, self.strict_loading = False, False
        self.gates = list(gates or [])
        if not self.verdict_gates and any(gate.needs_verdicts for gate in self.gates):
            raise ValueError(f"model.gates: {type(self).__name__} takes no sign-consistency gate (it is defined for "
                             f"lit_opd.modules.SampledTokenOPD and TeacherTopKLSM)")
        for gate in self.gates:
            gate.prepare(self.tokenizer)
        self.guard = NonfiniteGuard(max_nonfinite_steps)
        self.policy: CausalLMScorer | None = None
        self.teacher: TeacherEngine | None = None
        self.collector: RolloutCollector | None = None
        self.buffer: RolloutBuffer | None = None
        self.generator: torch.Generator | None = None
        self._step_started = 0.0

    @property
    def student(self):
        return self.policy.model

    @property
    def prompt_template(self) -> PromptTemplate:
        return datamodule_template(self._trainer)

    def configure_model(self) -> None:
        if self.policy is None:
            self.policy, self.teacher, self.collector = assemble(self)

    def setup(self, stage: str) -> None:
        if self.generator is None:
            self.generator = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + self.global_rank)

    def teardown(self, stage: str) -> None:
        if self.collector is not None:
            self.collector.close()

    def configure_optimizers(self):
        optimizer, scheduler = self.optim.build([p for p in self.policy.parameters() if p.requires_grad])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def generate_responses(
        self, prompt_ids: Tensor, prompt_mask: Tensor, sampling: SamplingConfig, generator: torch.Generator
    ) -> Generation:
        """Sample responses with the live student (what PassAtKEvaluation calls). [B, P] → Generation."""
        return self.collector.generate(self.policy, prompt_ids, prompt_mask, sampling, generator)

    def configure_callbacks(self):
        """Checkpoints complete or absent, the last step saved at the end of fit; the command's
        optimiser settings on resume."""
        return [ResumableCheckpoints(), CommandOptimiserSettings()]

    def save_student_pretrained(self, path: str, dtype: torch.dtype | None = None) -> None:
        """Write the student and tokenizer as a plain HF checkpoint, sharded or not, its weights in
        `dtype` (None: the master weights' own; every rank calls this; rank 0 writes)."""
        save_pretrained_full(self.policy, self.tokenizer, path, self.trainer.is_global_zero if self._trainer else True,
                             dtype)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.")}
        checkpoint["lit_opd"] = training_state(self, self.buffer, self.generator, self.guard)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Resuming a fit: refuse a checkpoint whose rollout buffer and data position this run's
        settings would misread, then restore this rank's buffer and sampling generator."""
        state = checkpoint.get("lit_opd")
        if state is None or self._trainer is None or self.trainer.state.fn != TrainerFn.FITTING:
            return
        buffer, generator = restore_training_state(self, state, str(self.trainer.ckpt_path), self.guard)
        self.buffer = buffer or self.buffer
        self.generator = generator or self.generator


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
