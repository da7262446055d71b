"""DistillationModule: the training loop every OPD variant shares, in the order it runs.

A training step opens a rollout batch when the data says so (`lit_opd.rollout`'s
`RolloutCollector`: generate → verify → mix teacher rollouts → split → score), then makes one
optimiser step on one mini-batch of it, cut into micro-batches by a token budget: per
micro-batch, student log-probs → the variant's position losses (`per_token_loss`, the one
override) → gates (YAML objects, composed by product, normalised over the whole step) → one
`gated_reduce` → backward. Its parts live beside this file: assembly (its settings and what it
runs on: `DistillationSetup`), step, state, optim; sharding in `lit_opd.sharding`.
"""

import time

import torch
from torch import Tensor

from lit_opd.losses import gated_reduce
from lit_opd.modules.assembly import DistillationSetup
from lit_opd.modules.state import check_opens_rollout, checkpoint_if_collection_fails
from lit_opd.modules.step import (MicroResult, StepPlan, compose, gather_results, gradient_norms, importance_weight,
                                  response_logprobs, step_logs, step_normalizers)
from lit_opd.rollout.buffer import RolloutBuffer
from lit_opd.rollout.micro_batches import step_micro_batches, take_micro_batch
from lit_opd.rollout.scoring import ScoringSettings, score_rows
from lit_opd.sharding import clip_gradient_norm, gradient_sync


class DistillationModule(DistillationSetup):
    """The shared base of the OPD LightningModules: the optimiser step. A variant declares its own
    arguments, passes the rest on (`**kwargs`, the settings of `DistillationSetup`) and implements
    `per_token_loss(mb, scores) -> [B, T]`; `position_gates` gives the gates that multiply."""

    def per_token_loss(self, mb: dict[str, Tensor], scores: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def fill_buffer(self, batch: dict) -> None:
        """Collect the rollout batch `batch` opens into the buffer, with its loss denominators; log
        its statistics. A collection that fails on any rank stops the run after a checkpoint."""
        check_opens_rollout(batch, self.buffer)
        with checkpoint_if_collection_fails(self.trainer, self.generator) as any_failed:
            minibatches, stats = self.collector.collect(batch, self.global_step, self.policy, self.generator, any_failed)
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

