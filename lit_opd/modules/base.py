"""DistillationModule: the training loop every OPD variant shares, in the order it runs.

A training step opens a rollout batch when the data says so (`RolloutCollector`: generate →
verify → mix teacher rollouts → score → split), then trains on one mini-batch of it: student
log-probs → the variant's position losses (`per_token_loss`, the one override) → gates (YAML
objects, composed by product) → one `gated_reduce`. Its parts live beside this file: loading,
collection, teacher_sampling, step, state; sharding in `lit_opd.sharding`.
"""

import time

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from torch.distributed.fsdp import FullyShardedDataParallel

from lit_opd.data.templates import PromptTemplate, datamodule_template
from lit_opd.gates import Gate
from lit_opd.logprobs import CausalLMScorer
from lit_opd.losses import Reduction, gated_reduce
from lit_opd.modules.collection import RolloutCollector
from lit_opd.modules.loading import check_same_vocabulary, load_causal_lm, load_tokenizer
from lit_opd.modules.settings import DType, OptimConfig, RolloutConfig
from lit_opd.modules.state import check_opens_rollout, drop_teacher_keys, restore_training_state, training_state
from lit_opd.modules.step import NonfiniteGuard, gradient_norms, response_logprobs, step_logs, step_normalizers
from lit_opd.rollout.buffer import RolloutBuffer
from lit_opd.rollout.engine import Generation, SamplingConfig
from lit_opd.sharding import save_pretrained_full, shard_scorers
from lit_opd.verify import available_cpus


class DistillationModule(L.LightningModule):
    """The shared base of the OPD LightningModules. A variant declares its own arguments, passes
    the rest on (`**kwargs`), sets `teacher_top_k` (the support size the teacher's scoring
    returns, 0 for none; `support_exclude`: ids never in it) and implements
    `per_token_loss(mb, scores) -> [B, T]`. Gates that need verifier verdicts (the sign gate) are
    defined for variants with `verdict_gates` only; `position_gates` gives the gates that multiply.

    Args:
        student / teacher: HF causal LM paths or hub ids; they must share a vocabulary.
        tokenizer: the tokenizer path (default: the student's); linked from data.tokenizer.
        dtype: the weights' dtype (under bf16-mixed, keep float32 master weights).
        rollout: how rollout batches are collected (`RolloutConfig`).
        optim: AdamW and its warm-up (`OptimConfig`).
        gates: gate objects (class_path in YAML), composed by product; [] for none.
        reduction: token_mean (Σ g m ℓ / Σ m over the global batch) or sequence_mean.
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

    def __init__(
        self,
        student: str,
        teacher: str,
        tokenizer: str | None = None,
        dtype: DType = "bfloat16",
        rollout: RolloutConfig = RolloutConfig(),
        optim: OptimConfig = OptimConfig(),
        gates: list[Gate] | None = None,
        reduction: Reduction = "token_mean",
        chunk_size: int = 1024,
        gradient_checkpointing: bool = False,
        shard_teacher: bool = True,
        max_nonfinite_steps: int = 5,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["gates"])
        self.student_path, self.teacher_path, self.dtype_name = student, teacher, dtype
        self.tokenizer = load_tokenizer(tokenizer or student, "tokenizer")
        check_same_vocabulary(self.tokenizer, load_tokenizer(teacher, "teacher"), student, teacher)
        self.rollout, self.optim, self.reduction, self.seed = rollout, optim, reduction, seed
        self.gates = list(gates or [])
        if not self.verdict_gates and any(gate.needs_verdicts for gate in self.gates):
            raise ValueError(f"model.gates: {type(self).__name__} takes no sign-consistency gate (it is defined for "
                             f"lit_opd.modules.SampledTokenOPD and TeacherTopKLSM)")
        for gate in self.gates:
            gate.prepare(self.tokenizer)
        self.chunk_size, self.gradient_checkpointing, self.shard_teacher = chunk_size, gradient_checkpointing, shard_teacher
        self.guard = NonfiniteGuard(max_nonfinite_steps)
        self.policy: CausalLMScorer | None = None
        self.teacher: CausalLMScorer | None = None
        self.collector: RolloutCollector | None = None
        self.buffer: RolloutBuffer | None = None
        self.generator: torch.Generator | None = None
        self.strict_loading = False
        self._step_started = 0.0

    @property
    def student(self):
        return self.policy.model

    @property
    def prompt_template(self) -> PromptTemplate:
        return datamodule_template(self._trainer)

    def per_token_loss(self, mb: dict[str, Tensor], scores: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------------- set-up
    def configure_model(self) -> None:
        if self.policy is not None:
            return
        student = load_causal_lm(self.student_path, self.dtype_name, "student", self.tokenizer)
        teacher = load_causal_lm(self.teacher_path, self.dtype_name, "teacher", self.tokenizer)
        if self.gradient_checkpointing:
            student.gradient_checkpointing_enable()
        teacher.requires_grad_(False).eval()
        self.policy = CausalLMScorer(student, self.chunk_size)
        self.teacher = CausalLMScorer(teacher, self.chunk_size)
        if self._trainer is not None and isinstance(self.trainer.strategy, (ModelParallelStrategy, FSDPStrategy)):
            self.policy, self.teacher = shard_scorers(self, self.policy, self.teacher, self.shard_teacher)
            # Sharded checkpoints load exactly the keys of the module's state dict, and checkpoints
            # hold no teacher (it is frozen and reloaded from model.teacher).
            self.register_state_dict_post_hook(drop_teacher_keys)

    def setup(self, stage: str) -> None:
        verdicts = any(gate.needs_verdicts for gate in self.gates)
        workers = max(1, available_cpus() // max(self.trainer.num_devices, 1))
        self.collector = RolloutCollector(self.rollout, self.tokenizer, self.teacher_top_k, verdicts, workers,
                                          self.support_exclude)
        if self.generator is None:
            self.generator = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + self.global_rank)
        if stage == "fit":
            steps = self.trainer.datamodule.schedule.num_minibatches if self.trainer.datamodule else 1
            if steps % self.trainer.accumulate_grad_batches:
                raise ValueError(
                    f"data.num_minibatches={steps} must be a multiple of "
                    f"trainer.accumulate_grad_batches={self.trainer.accumulate_grad_batches}"
                )

    def teardown(self, stage: str) -> None:
        if self.collector is not None:
            self.collector.close()

    def configure_optimizers(self):
        optimizer, scheduler = self.optim.build([p for p in self.policy.parameters() if p.requires_grad])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Under FSDP1, clipping by norm is the wrapped student's `clip_grad_norm_` (the norm of
        all shards), which Lightning's FSDP precision plugin does not do; otherwise Lightning's."""
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm") and isinstance(
                self.policy, FullyShardedDataParallel):
            self.policy.clip_grad_norm_(gradient_clip_val)
        else:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ------------------------------------------------------------------------- rollouts
    def generate_responses(
        self, prompt_ids: Tensor, prompt_mask: Tensor, sampling: SamplingConfig, generator: torch.Generator
    ) -> Generation:
        """Sample responses with the live student (what PassAtKEvaluation calls). [B, P] → Generation."""
        return self.collector.generate(self.policy, prompt_ids, prompt_mask, sampling, generator)

    def fill_buffer(self, batch: dict) -> None:
        """Collect the rollout batch `batch` opens into the buffer, with its loss denominators."""
        minibatches, stats = self.collector.collect(batch, self.global_step, self.policy, self.teacher, self.generator)
        normalizers = step_normalizers([mb["response_mask"] for mb in minibatches], self.reduction,
                                       self.trainer.accumulate_grad_batches, self.trainer.world_size, self.device)
        self.buffer = RolloutBuffer(batch["rollout_index"], minibatches, normalizers, stats)

    # ----------------------------------------------------------------------------- step
    def student_scores(self, mb: dict[str, Tensor]) -> dict[str, Tensor]:
        """log π_θ of the sampled tokens (and of the teacher's support, where the loss needs it)."""
        support = mb.get("teacher_topk_ids")
        return self.policy(mb["input_ids"], mb["attention_mask"], mb["response_ids"].shape[1], support=support)

    def position_gates(self, mb: dict[str, Tensor], logp: Tensor) -> list[Tensor]:
        """The gates g_t [B, T] that multiply the position losses: every configured gate."""
        return [gate(mb, logp) for gate in self.gates]

    def training_step(self, batch: dict, batch_idx: int):
        self._step_started = time.perf_counter()
        if self.buffer is None or self.buffer.rollout_index != batch["rollout_index"]:
            check_opens_rollout(batch, self.buffer)
            self.fill_buffer(batch)
            self.log_dict(self.buffer.stats)
        mb = {k: v.to(self.device) for k, v in self.buffer.minibatches[batch["minibatch_index"]].items()}
        scores = self.student_scores(mb)
        where = f"rollout batch {batch['rollout_index']}, mini-batch {batch['minibatch_index']}"
        if bad := self.guard.nonfinite(response_logprobs(mb, scores), self.device):
            self.guard.skip(f"non-finite {' and '.join(bad)} ({where})", self.global_step)
            return scores["logp"].sum() * 0.0  # every rank runs the same backward; its gradients are discarded
        gates = self.position_gates(mb, scores["logp"])
        position_loss = self.per_token_loss(mb, scores)
        loss = gated_reduce(position_loss, gates, mb["response_mask"], self.reduction,
                            self.buffer.normalizers[batch["minibatch_index"]])
        if self.guard.nonfinite({"loss": loss}, self.device):
            self.guard.skip(f"non-finite loss ({where})", self.global_step)
            return scores["logp"].sum() * 0.0
        self.log_step(mb, scores["logp"], gates, position_loss, batch["reuse_index"])
        return loss

    def log_step(self, mb, logp: Tensor, gates: list[Tensor], position_loss: Tensor, reuse_index: int) -> None:
        """This mini-batch's scalars (local means), the gates' own statistics and the gate histogram."""
        scalars, gate_values = step_logs(mb, logp, gates, position_loss, self.reduction)
        scalars["train/reuse_index"] = float(reuse_index)
        for gate in self.gates:
            scalars.update(gate.statistics(mb, logp.detach()))
        self.log_dict(scalars)
        experiment = getattr(self.logger, "experiment", None)
        if gates and hasattr(experiment, "add_histogram"):
            experiment.add_histogram("train/gate", gate_values.float().cpu(), self.global_step)

    def on_before_optimizer_step(self, optimizer) -> None:
        """Discard the gradients of a skipped step or of non-finite gradients (`NonfiniteGuard`)."""
        checked = not self.guard.discard and getattr(self.trainer.precision_plugin, "scaler", None) is None
        norms = gradient_norms(self.policy.parameters()) if checked else None
        self.guard.before_optimizer_step(optimizer, norms, self.global_step, self.device)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.log("perf/student_s", time.perf_counter() - self._step_started)
        self.log("train/nonfinite_skipped", float(self.guard.skipped))

    # ------------------------------------------------------------------ validate / test
    def validation_step(self, batch, batch_idx) -> None:
        """No-op: `validate`/`test` run the PassAtKEvaluation callback on benchmarks."""

    def test_step(self, batch, batch_idx) -> None:
        """No-op: see `validation_step`."""

    # ----------------------------------------------------------------------- checkpoints
    def save_student_pretrained(self, path: str) -> None:
        """Write the student and tokenizer as a plain HF checkpoint, sharded or not (every rank
        calls this; rank 0 writes)."""
        save_pretrained_full(self.policy, self.tokenizer, path, self.trainer.is_global_zero if self._trainer else True)

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
