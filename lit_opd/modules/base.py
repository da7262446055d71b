"""DistillationModule: the training loop every OPD variant shares, in the order it runs.

A training step opens a rollout batch when the data says so (`lit_opd.rollout`'s
`RolloutCollector`: generate → verify → mix teacher rollouts → split → score), then makes one
optimiser step on one mini-batch of it, cut into micro-batches by a token budget: per
micro-batch, student log-probs → the variant's position losses (`per_token_loss`, the one
override) → gates (YAML objects, composed by product, normalised over the whole step) → one
`gated_reduce` → backward. Its parts live beside this file: assembly (what it runs on), step,
state, optim; sharding in `lit_opd.sharding`.
"""

import time

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

from lit_opd.data.templates import PromptTemplate, datamodule_template
from lit_opd.gates import Gate
from lit_opd.loading import DType, check_same_vocabulary, load_tokenizer
from lit_opd.logprobs import CausalLMScorer
from lit_opd.losses import Reduction, gated_reduce
from lit_opd.modules.assembly import assemble
from lit_opd.modules.optim import OptimConfig
from lit_opd.modules.state import (check_opens_rollout, checkpoint_if_teacher_unreachable, restore_training_state,
                                   training_state)
from lit_opd.modules.step import (MicroResult, NonfiniteGuard, StepPlan, compose, gather_results, gradient_norms,
                                  importance_weight, response_logprobs, step_logs, step_normalizers)
from lit_opd.rollout.buffer import RolloutBuffer
from lit_opd.rollout.collection import RolloutCollector
from lit_opd.rollout.engine import Generation, SamplingConfig
from lit_opd.rollout.factory import TeacherPlacement, check_teacher_placement
from lit_opd.rollout.micro_batches import step_micro_batches, take_micro_batch
from lit_opd.rollout.scoring import ScoringSettings, score_rows
from lit_opd.rollout.settings import RolloutConfig
from lit_opd.rollout.teacher_engines import TeacherEngine, TeacherServing
from lit_opd.sharding import clip_gradient_norm, gradient_sync, save_pretrained_full


class DistillationModule(L.LightningModule):
    """The shared base of the OPD LightningModules. A variant declares its own arguments, passes
    the rest on (`**kwargs`), sets `teacher_top_k` (the support size the teacher's scoring
    returns, 0 for none; `support_exclude`: ids never in it) and implements
    `per_token_loss(mb, scores) -> [B, T]`. Gates that need verifier verdicts (the sign gate) are
    defined for variants with `verdict_gates` only; `position_gates` gives the gates that multiply.
    A loss that reads the teacher's full logits names itself in `full_teacher_logits`.

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
        self.save_hyperparameters(ignore=["gates"])
        check_teacher_placement(teacher_engine, teacher_url, self.full_teacher_logits)
        self.student_path, self.teacher_path, self.dtype_name, self.teacher_dtype_name = student, teacher, dtype, teacher_dtype
        self.teacher_engine, self.teacher_url, self.teacher_serving = teacher_engine, teacher_url, teacher_serving
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

    def per_token_loss(self, mb: dict[str, Tensor], scores: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

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

    def fill_buffer(self, batch: dict) -> None:
        """Collect the rollout batch `batch` opens into the buffer, with its loss denominators; log
        its statistics. A teacher server that stays unreachable stops the run after a checkpoint."""
        check_opens_rollout(batch, self.buffer)
        with checkpoint_if_teacher_unreachable(self.trainer, self.generator):
            minibatches, stats = self.collector.collect(batch, self.global_step, self.policy, self.generator)
        normalizers = step_normalizers([mb["response_mask"] for mb in minibatches], self.reduction,
                                       self.trainer.world_size, self.device)
        self.buffer = RolloutBuffer(batch["rollout_index"], minibatches, normalizers, stats)
        self.log_dict(stats)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        """One optimiser step on mini-batch `minibatch_index` of the rollout batch (collected first
        if this item opens it): the plan (behaviour log-probs, step-wide gates) → a forward and
        backward per micro-batch → the optimiser step. Returns the step's loss."""
        self._step_started = time.perf_counter()
        if self.buffer is None or self.buffer.rollout_index != batch["rollout_index"]:
            self.fill_buffer(batch)
        index, normalizer = batch["minibatch_index"], self.buffer.normalizers[batch["minibatch_index"]]
        mb = {k: v.to(self.device) for k, v in self.buffer.minibatches[index].items()}
        parts = step_micro_batches(mb, self.micro_batch_tokens, self.device)
        plan = self.plan_step(mb, parts)
        results = []
        for k, rows in enumerate(parts):
            with gradient_sync(self.policy, k == len(parts) - 1):
                results.append(self.micro_step(plan, rows, normalizer))
        mb = plan.minibatch
        logp, position_loss, gate, bad = gather_results(results, like=mb["teacher_logp"], bad=plan.bad)
        if bad:
            where = f"rollout batch {batch['rollout_index']}, mini-batch {index}"
            self.guard.skip(f"non-finite {' and '.join(dict.fromkeys(bad))} ({where})", self.global_step)
        self.optimizer_step()
        mb.setdefault("old_logp", logp)  # the rollout batch's first step: its forwards gave them
        self.buffer.keep_behaviour_logprobs(index, mb["old_logp"])
        gates = [gate] if self.gates else []
        if not bad:  # a skipped step's values are not the step's
            self.log_step(mb, logp, gates, position_loss, batch["reuse_index"])
        return gated_reduce(position_loss, gates, mb["response_mask"], self.reduction, normalizer)

    def plan_step(self, mb: dict[str, Tensor], parts: list[Tensor | None]) -> StepPlan:
        """What the step takes as given before its forwards: its behaviour log-probs and gates.

        Gates normalise over the whole step, so with several micro-batches they need the step's
        current log-probs first: a no-grad pre-pass (`current_logprobs`), which on the rollout
        batch's first step also gives the behaviour log-probs (π_old = π_θ), and which gates that
        read no log-probs do without. With one micro-batch, or no gates, nothing is given: each
        micro-batch's forward gives its gates and, on the first step, its behaviour log-probs (no
        separate forward for them)."""
        if len(parts) == 1 or not self.gates:
            return StepPlan(mb, None, [])
        if "old_logp" not in mb:  # the rollout batch's first step: π_old = π_θ
            mb = {**mb, "old_logp": self.current_logprobs(mb)}
            logp = mb["old_logp"]
        else:
            logp = self.current_logprobs(mb) if self.gates_read_logp else mb["old_logp"]
        bad = self.guard.nonfinite({"student log-probs": logp[mb["response_mask"]]}, self.device)
        return StepPlan(mb, self.position_gates(mb, mb["old_logp"] if bad else logp), bad)

    def micro_step(self, plan: StepPlan, rows: Tensor | None, normalizer: float) -> MicroResult:
        """Forward and backward of rows `rows` of the step's mini-batch (None: an empty micro-batch,
        run for its collectives). Behaviour log-probs the plan does not give are this forward's (the
        weights have not moved since the rollout); gates are the plan's rows of them, or this
        micro-batch's own. A collective: every rank calls it as often."""
        micro = take_micro_batch(plan.minibatch, rows)
        scores = self.student_scores(micro)
        logp = scores["logp"].detach()
        micro = {**micro, "old_logp": micro.get("old_logp", logp)}
        nothing = scores["logp"].sum() * 0.0  # a backward with the same collectives as any other
        if bad := self.guard.nonfinite(response_logprobs(micro, scores), self.device):
            self.manual_backward(nothing)
            return MicroResult(rows, logp, bad=bad)
        loss, position_loss, gate = nothing, None, None
        if rows is not None:
            width = micro["response_mask"].shape[1]
            gates = self.position_gates(micro, scores["logp"]) if plan.gates is None else [
                g[rows.to(g.device), :width] for g in plan.gates]
            position_loss = self.per_token_loss(micro, scores) * importance_weight(micro, self.rollout.vllm.importance_cap)
            loss = gated_reduce(position_loss, gates, micro["response_mask"], self.reduction, normalizer)
            position_loss, gate = position_loss.detach(), compose(gates, position_loss).detach()
        bad = ["loss"] if self.guard.nonfinite({"loss": loss}, self.device) else []
        self.manual_backward(nothing if bad else loss)
        return MicroResult(rows, logp, position_loss, gate, bad)

    @torch.no_grad()
    def current_logprobs(self, mb: dict[str, Tensor]) -> Tensor:
        """[N, T] log π_θ of the mini-batch's sampled tokens, a no-grad forward per micro-batch."""
        started = time.perf_counter()
        logp = score_rows(self.policy, mb, ScoringSettings(micro_batch_tokens=self.micro_batch_tokens))["logp"]
        self.log("perf/current_logp_s", time.perf_counter() - started)
        return logp

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

    def optimizer_step(self) -> None:
        """The optimiser and LR-schedule step after the micro-batches, its gradients checked
        (`NonfiniteGuard`) and clipped (optim.gradient_clip_val). A skipped step still steps."""
        optimizer = self.optimizers()
        checked = not self.guard.discard and getattr(self.trainer.precision_plugin, "scaler", None) is None
        norms = gradient_norms(self.policy.parameters()) if checked else None
        if self.guard.before_optimizer_step(optimizer, norms, self.global_step, self.device) and self.optim.gradient_clip_val:
            clip_gradient_norm(self, self.policy, optimizer, self.optim.gradient_clip_val)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.lr_schedulers().step()

    def log_step(self, mb, logp: Tensor, gates: list[Tensor], position_loss: Tensor, reuse_index: int) -> None:
        """The step's scalars (local means), the gates' own statistics and the gate histogram."""
        scalars, gate_values = step_logs(mb, logp, gates, position_loss, self.reduction, reuse_index,
                                         self.rollout.vllm.importance_cap)
        for gate in self.gates:
            scalars.update(gate.statistics(mb, logp.detach()))
        self.log_dict(scalars)
        experiment = getattr(self.logger, "experiment", None)
        if gates and hasattr(experiment, "add_histogram"):
            experiment.add_histogram("train/gate", gate_values.float().cpu(), self.global_step)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.log("perf/student_s", time.perf_counter() - self._step_started)
        self.log("train/nonfinite_skipped", float(self.guard.skipped))

    def validation_step(self, batch, batch_idx) -> None:
        """No-op: `validate`/`test` run the PassAtKEvaluation callback on benchmarks."""

    def test_step(self, batch, batch_idx) -> None:
        """No-op: see `validation_step`."""

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
