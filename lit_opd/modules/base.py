"""DistillationModule: the training loop every OPD variant shares, in the order it runs.

A training step opens a rollout batch when the data says so (`RolloutCollector`: generate →
verify → mix teacher rollouts → score → split), then makes one optimiser step on one mini-batch
of it, cut into micro-batches by a token budget: per micro-batch, student log-probs → the
variant's position losses (`per_token_loss`, the one override) → gates (YAML objects, composed by
product, normalised over the whole step) → one `gated_reduce` → backward. Its parts live beside
this file: loading, collection, teacher_sampling, micro_batches, step, state; sharding in
`lit_opd.sharding`.
"""

import time
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from torch.distributed.fsdp import FullyShardedDataParallel

from lit_opd.checkpointing import save_last_checkpoint
from lit_opd.data.templates import PromptTemplate, datamodule_template
from lit_opd.gates import Gate
from lit_opd.logprobs import CausalLMScorer
from lit_opd.losses import Reduction, gated_reduce
from lit_opd.modules.collection import RolloutCollector
from lit_opd.modules.loading import check_same_vocabulary, load_causal_lm, load_tokenizer
from lit_opd.modules.settings import DType, OptimConfig, RolloutConfig, frozen_teacher_dtype
from lit_opd.modules.state import check_opens_rollout, drop_teacher_keys, restore_training_state, training_state
from lit_opd.modules.micro_batches import scatter_rows, step_micro_batches, take_micro_batch
from lit_opd.modules.step import (NonfiniteGuard, compose, gradient_norms, importance_weight, response_logprobs,
                                  rollout_logs, step_logs, step_normalizers)
from lit_opd.rollout.buffer import RolloutBuffer
from lit_opd.rollout.engine import Generation, SamplingConfig
from lit_opd.rollout.teacher_engines import TeacherServing, TeacherUnreachable, build_teacher_engine
from lit_opd.rollout.vllm_engine import require_vllm
from lit_opd.sharding import gradient_sync, save_pretrained_full, shard_scorers
from lit_opd.verify import available_cpus


class DistillationModule(L.LightningModule):
    """The shared base of the OPD LightningModules. A variant declares its own arguments, passes
    the rest on (`**kwargs`), sets `teacher_top_k` (the support size the teacher's scoring
    returns, 0 for none; `support_exclude`: ids never in it) and implements
    `per_token_loss(mb, scores) -> [B, T]`. Gates that need verifier verdicts (the sign gate) are
    defined for variants with `verdict_gates` only; `position_gates` gives the gates that multiply.

    Args:
        student: the student, an HF causal LM path or hub id.
        teacher: the teacher, an HF causal LM path or hub id sharing the student's vocabulary.
        tokenizer: the tokenizer path (default: the student's); linked from data.tokenizer.
        dtype: the student's weights' dtype (under bf16-mixed, keep float32 master weights).
        teacher_dtype: the frozen teacher's weights' dtype (None: bfloat16 under bf16-mixed
            precision, which computes in bfloat16 anyway, else `dtype`; `settings.frozen_teacher_dtype`).
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

    def __init__(
        self,
        student: str,
        teacher: str,
        tokenizer: str | None = None,
        dtype: DType = "bfloat16",
        teacher_dtype: DType | None = None,
        teacher_engine: Literal["trainer", "vllm"] = "trainer",
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
        self.save_hyperparameters(ignore=["gates"])
        self.student_path, self.teacher_path, self.dtype_name = student, teacher, dtype
        self.teacher_dtype_name = teacher_dtype
        if teacher_url and teacher_engine != "trainer":
            raise ValueError("model.teacher_url and model.teacher_engine: vllm both place the teacher: set one")
        self.teacher_engine, self.teacher_url, self.teacher_serving = teacher_engine, teacher_url, teacher_serving
        require_vllm(rollout.engine)
        self.tokenizer = load_tokenizer(tokenizer or student, "tokenizer")
        check_same_vocabulary(self.tokenizer, load_tokenizer(teacher, "teacher"), student, teacher)
        self.rollout, self.optim, self.reduction, self.seed = rollout, optim, reduction, seed
        self.micro_batch_tokens = micro_batch_tokens
        self.automatic_optimization = False
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
        if self.gradient_checkpointing:
            student.gradient_checkpointing_enable()
        student.train()  # from_pretrained returns eval mode, in which HF skips gradient checkpointing
        self.policy = CausalLMScorer(student, self.chunk_size)
        teacher_dtype = frozen_teacher_dtype(self.teacher_dtype_name, self.dtype_name,
                                             self._trainer.precision if self._trainer is not None else None)
        if self.teacher_outside:
            self.teacher = build_teacher_engine(self.teacher_url, self.teacher_path, self.teacher_serving,
                                                self.teacher_top_k + len(self.support_exclude), teacher_dtype)
        else:
            teacher = load_causal_lm(self.teacher_path, teacher_dtype, "teacher", self.tokenizer)
            self.teacher = CausalLMScorer(teacher.requires_grad_(False).eval(), self.chunk_size)
        if self._trainer is not None and isinstance(self.trainer.strategy, (ModelParallelStrategy, FSDPStrategy)):
            if self.rollout.engine == "vllm" and isinstance(self.trainer.strategy, FSDPStrategy):
                raise ValueError("rollout.engine: vllm takes the student's weights from FSDP2, not FSDPStrategy (FSDP1): "
                                 "use ModelParallelStrategy (configs/strategies/fsdp2.yaml)")
            local_teacher = None if self.teacher_outside else self.teacher
            self.policy, local_teacher = shard_scorers(self, self.policy, local_teacher, self.shard_teacher)
            self.teacher = local_teacher or self.teacher
            # Sharded checkpoints load exactly the keys of the module's state dict, and checkpoints
            # hold no teacher (it is frozen and reloaded from model.teacher).
            self.register_state_dict_post_hook(drop_teacher_keys)

    def setup(self, stage: str) -> None:
        verdicts = any(gate.needs_verdicts for gate in self.gates)
        workers = max(1, available_cpus() // max(self.trainer.num_devices, 1))
        self.collector = RolloutCollector(self.rollout, self.tokenizer, self.teacher_top_k, verdicts, workers,
                                          self.support_exclude, self.micro_batch_tokens, self.student_path)
        if self.generator is None:
            self.generator = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + self.global_rank)

    @property
    def teacher_outside(self) -> bool:
        """The teacher runs outside the trainer (a colocated vLLM engine or a server)."""
        return self.teacher_engine != "trainer" or bool(self.teacher_url)

    def teardown(self, stage: str) -> None:
        if self.collector is not None:
            self.collector.close()
        if self.teacher_outside and self.teacher is not None:
            self.teacher.close()

    def configure_optimizers(self):
        optimizer, scheduler = self.optim.build([p for p in self.policy.parameters() if p.requires_grad])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def clip_student_gradients(self, optimizer) -> None:
        """Clip by global norm (optim.gradient_clip_val): under FSDP1 the wrapped student's
        `clip_grad_norm_` (the norm of all shards), which Lightning's FSDP precision plugin does
        not do; otherwise Lightning's."""
        if isinstance(self.policy, FullyShardedDataParallel):
            self.policy.clip_grad_norm_(self.optim.gradient_clip_val)
        else:
            self.clip_gradients(optimizer, self.optim.gradient_clip_val, "norm")

    # ------------------------------------------------------------------------- rollouts
    def generate_responses(
        self, prompt_ids: Tensor, prompt_mask: Tensor, sampling: SamplingConfig, generator: torch.Generator
    ) -> Generation:
        """Sample responses with the live student (what PassAtKEvaluation calls). [B, P] → Generation."""
        return self.collector.generate(self.policy, prompt_ids, prompt_mask, sampling, generator)

    def fill_buffer(self, batch: dict) -> None:
        """Collect the rollout batch `batch` opens into the buffer, with its loss denominators. If a
        teacher server stays unreachable on any rank, every rank puts its sampling generator back,
        a checkpoint of the last finished step is written, and the run stops."""
        generator_state, unreachable = self.generator.get_state(), None
        try:
            minibatches, stats = self.collector.collect(batch, self.global_step, self.policy, self.teacher,
                                                        self.generator)
        except TeacherUnreachable as error:
            unreachable = error
        if self.trainer.strategy.reduce_boolean_decision(unreachable is not None, all=False):
            self.generator.set_state(generator_state)
            path = save_last_checkpoint(self.trainer)
            raise TeacherUnreachable(f"{unreachable or 'a teacher server of another rank did not answer'}; wrote "
                                     f"{path}: resume with --ckpt_path last") from None
        normalizers = step_normalizers([mb["response_mask"] for mb in minibatches], self.reduction,
                                       self.trainer.world_size, self.device)
        self.buffer = RolloutBuffer(batch["rollout_index"], minibatches, normalizers, stats)

    # ----------------------------------------------------------------------------- step
    def student_scores(self, mb: dict[str, Tensor]) -> dict[str, Tensor]:
        """log π_θ of the sampled tokens (and of the teacher's support, where the loss needs it)."""
        support = mb.get("teacher_topk_ids")
        return self.policy(mb["input_ids"], mb["attention_mask"], mb["response_ids"].shape[1], support=support)

    def position_gates(self, mb: dict[str, Tensor], logp: Tensor) -> list[Tensor]:
        """The gates g_t [B, T] that multiply the position losses: every configured gate."""
        return [gate(mb, logp) for gate in self.gates]

    @property
    def gates_read_logp(self) -> bool:
        return any(gate.reads_logp for gate in self.gates)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        """One optimiser step on mini-batch `minibatch_index` of the rollout batch (opened first if
        this item starts it), a forward and backward per micro-batch; returns the step's loss."""
        self._step_started = time.perf_counter()
        if self.buffer is None or self.buffer.rollout_index != batch["rollout_index"]:
            check_opens_rollout(batch, self.buffer)
            self.fill_buffer(batch)
            self.log_dict(self.buffer.stats)
        index = batch["minibatch_index"]
        mb = {k: v.to(self.device) for k, v in self.buffer.minibatches[index].items()}
        parts = step_micro_batches(mb, self.micro_batch_tokens, self.device)
        fresh = "old_logp" not in mb  # the rollout batch's first step: π_old is π_θ, read off its forward
        record = {"logp": torch.zeros_like(mb["teacher_logp"]), "loss": torch.zeros_like(mb["teacher_logp"]),
                  "gate": torch.ones_like(mb["teacher_logp"])}
        bad, step_gates = [], None
        if len(parts) > 1 and self.gates:  # gates normalise over the whole step: they need its current log-probs first
            if fresh:  # before any forward of the step: a pre-pass (then π_old = π_θ)
                mb["old_logp"] = self.current_logprobs(mb, parts)
            logp = mb["old_logp"] if fresh or not self.gates_read_logp else self.current_logprobs(mb, parts)
            bad = self.guard.nonfinite({"student log-probs": logp[mb["response_mask"]]}, self.device)
            step_gates = self.position_gates(mb, mb["old_logp"] if bad else logp)
        for k, rows in enumerate(parts):
            with gradient_sync(self.policy, k == len(parts) - 1):
                bad += self.micro_step(take_micro_batch(mb, rows), rows, step_gates, index, record)
        if bad:
            where = f"rollout batch {batch['rollout_index']}, mini-batch {index}"
            self.guard.skip(f"non-finite {' and '.join(dict.fromkeys(bad))} ({where})", self.global_step)
        self.optimizer_step()
        if fresh:  # kept for the rollout batch's later steps
            kept = self.buffer.minibatches[index]
            kept["old_logp"] = mb.setdefault("old_logp", record["logp"]).to(kept["teacher_logp"].device)
        gates = [record["gate"]] if self.gates else []
        if not bad:  # a skipped step's values are not the step's
            self.log_step(mb, record["logp"], gates, record["loss"], batch["reuse_index"])
        return gated_reduce(record["loss"], gates, mb["response_mask"], self.reduction, self.buffer.normalizers[index])

    def micro_step(self, micro, rows, step_gates, index: int, record: dict[str, Tensor]) -> list[str]:
        """Forward and backward of one micro-batch (rows `rows` of the mini-batch; None: an empty
        one); its log-probs, position losses and gates go into `record`. On a rollout batch's first
        step the forward's log-probs are also the behaviour log-probs (the weights have not moved
        since the rollout). Returns the names of the non-finite values met (a collective: every
        rank calls it as often)."""
        scores = self.student_scores(micro)
        micro.setdefault("old_logp", scores["logp"].detach())
        scatter_rows(record["logp"], rows, scores["logp"].detach())
        nothing = scores["logp"].sum() * 0.0  # a backward with the same collectives as any other
        if bad := self.guard.nonfinite(response_logprobs(micro, scores), self.device):
            self.manual_backward(nothing)
            return bad
        loss = nothing
        if rows is not None:
            width = micro["response_mask"].shape[1]
            gates = self.position_gates(micro, scores["logp"]) if step_gates is None else [
                g[rows.to(g.device), :width] for g in step_gates]
            position_loss = self.per_token_loss(micro, scores) * importance_weight(micro, self.rollout.vllm.importance_cap)
            loss = gated_reduce(position_loss, gates, micro["response_mask"], self.reduction,
                                self.buffer.normalizers[index])
            for key, value in (("loss", position_loss), ("gate", compose(gates, position_loss))):
                scatter_rows(record[key], rows, value.detach())
        if self.guard.nonfinite({"loss": loss}, self.device):
            self.manual_backward(nothing)
            return ["loss"]
        self.manual_backward(loss)
        return []

    @torch.no_grad()
    def current_logprobs(self, mb: dict[str, Tensor], parts: list[Tensor | None]) -> Tensor:
        """[N, T] log π_θ of the mini-batch's sampled tokens, a no-grad forward per micro-batch."""
        started, logp = time.perf_counter(), torch.zeros_like(mb["teacher_logp"])
        for rows in parts:
            micro = take_micro_batch(mb, rows)
            scatter_rows(logp, rows, self.policy(micro["input_ids"], micro["attention_mask"],
                                                 micro["response_ids"].shape[1])["logp"])
        self.log("perf/current_logp_s", time.perf_counter() - started)
        return logp

    def optimizer_step(self) -> None:
        """The optimiser and LR-schedule step after the micro-batches, its gradients checked
        (`NonfiniteGuard`) and clipped (optim.gradient_clip_val). A skipped step still steps."""
        optimizer = self.optimizers()
        checked = not self.guard.discard and getattr(self.trainer.precision_plugin, "scaler", None) is None
        norms = gradient_norms(self.policy.parameters()) if checked else None
        if self.guard.before_optimizer_step(optimizer, norms, self.global_step, self.device) and self.optim.gradient_clip_val:
            self.clip_student_gradients(optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.lr_schedulers().step()

    def log_step(self, mb, logp: Tensor, gates: list[Tensor], position_loss: Tensor, reuse_index: int) -> None:
        """The step's scalars (local means), the gates' own statistics and the gate histogram."""
        scalars, gate_values = step_logs(mb, logp, gates, position_loss, self.reduction)
        scalars["train/reuse_index"] = float(reuse_index)
        if reuse_index == 0:  # the weights of the rollout
            scalars.update(rollout_logs(mb, self.rollout.vllm.importance_cap))
        for gate in self.gates:
            scalars.update(gate.statistics(mb, logp.detach()))
        self.log_dict(scalars)
        experiment = getattr(self.logger, "experiment", None)
        if gates and hasattr(experiment, "add_histogram"):
            experiment.add_histogram("train/gate", gate_values.float().cpu(), self.global_step)

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
