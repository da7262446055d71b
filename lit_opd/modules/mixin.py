"""GatedLossMixin: the training loop every OPD variant shares.

One training step: (when a rollout batch opens) generate → score → fill the buffer; then on one
mini-batch of the buffer: student log-probs → the variant's position losses (`per_token_loss`,
the one override) → gates (YAML objects, composed by product) → one `gated_reduce`.
"""

import time
from dataclasses import dataclass
from typing import Literal

import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, AutoTokenizer

from lit_opd.checkpointing import check_resume_layout, gather_rank_states, resume_layout
from lit_opd.data.templates import PromptTemplate, eos_token_ids
from lit_opd.gates import Gate
from lit_opd.logprobs import CausalLMScorer
from lit_opd.losses import Reduction, gated_reduce
from lit_opd.rollout.buffer import RolloutBuffer, split_rows
from lit_opd.rollout.engine import Generation, HFGenerateEngine, RolloutEngine, SamplingConfig
from lit_opd.sharding import (
    fsdp_mesh,
    gathered,
    mixed_precision_policy,
    save_pretrained_full,
    shard_scorer,
    wrap_scorer_fsdp1,
)

DType = Literal["float32", "bfloat16", "float16"]


@dataclass
class RolloutConfig:
    """How the student samples rollouts. num_samples responses per prompt; temperature 0 is
    greedy; engine "fast" is the static-KV-cache engine (falls back to "hf" where unsupported);
    score_batch_size rows per no-grad forward when scoring a rollout batch."""

    num_samples: int = 8
    max_new_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    engine: Literal["fast", "hf"] = "fast"
    score_batch_size: int = 64

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.max_new_tokens, self.temperature, self.top_p, self.top_k)


@dataclass
class OptimConfig:
    """AdamW with linear warm-up to a constant learning rate."""

    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0


# Hyperparameters of modules built in Python hold these; checkpoints load with weights_only=True.
torch.serialization.add_safe_globals([RolloutConfig, OptimConfig])


def load_tokenizer(path: str, role: str):
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as error:
        raise ValueError(f"model.{role}: cannot load a tokenizer from {path!r}: {error}") from error
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_same_vocabulary(student_tokenizer, teacher_tokenizer, student: str, teacher: str) -> None:
    """Student and teacher must map every token to the same id (rows of the embedding beyond the
    tokenizer's size are padding and do not count)."""
    s, t = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if s == t:
        return
    only_s, only_t = sorted(set(s) - set(t))[:5], sorted(set(t) - set(s))[:5]
    moved = sorted(k for k in set(s) & set(t) if s[k] != t[k])[:5]
    raise ValueError(
        f"teacher {teacher!r} and student {student!r} tokenizers differ "
        f"({len(s)} vs {len(t)} tokens; only in student: {only_s}; only in teacher: {only_t}; "
        f"different ids: {moved}): on-policy distillation needs one shared vocabulary"
    )


def load_causal_lm(path: str, dtype: DType, role: str):
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    except Exception as error:
        raise ValueError(f"model.{role}: cannot load a causal LM from {path!r}: {error}") from error


def drop_teacher_keys(module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict post-hook: the frozen teacher's parameters are not training state."""
    for key in [k for k in state_dict if k.startswith(prefix + "teacher.")]:
        del state_dict[key]


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


class GatedLossMixin:
    """Shared orchestration of the OPD LightningModules (use with `L.LightningModule`).

    Subclasses call `init_distillation(...)` from their typed `__init__`, set `teacher_top_k`
    (support size the teacher must return, 0 for none) and `needs_verdicts`, and implement
    `per_token_loss(batch, scores) -> [B, T]`. Contract used by callbacks: `student`,
    `tokenizer`, `prompt_template`, `generate_responses(...)`.
    """

    teacher_top_k: int = 0
    needs_verdicts: bool = False

    def init_distillation(
        self,
        student: str,
        teacher: str,
        tokenizer: str | None,
        dtype: DType,
        rollout: RolloutConfig,
        optim: OptimConfig,
        gates: list[Gate] | None,
        reduction: Reduction,
        chunk_size: int,
        gradient_checkpointing: bool,
        max_nonfinite_steps: int,
        seed: int,
        verify_timeout: float = 5.0,
        shard_teacher: bool = True,
    ) -> None:
        self.student_path, self.teacher_path = student, teacher
        self.shard_teacher = shard_teacher
        self.tokenizer = load_tokenizer(tokenizer or student, "tokenizer")
        check_same_vocabulary(self.tokenizer, load_tokenizer(teacher, "teacher"), student, teacher)
        self.dtype_name, self.rollout, self.optim = dtype, rollout, optim
        self.gates = list(gates or [])
        for gate in self.gates:
            gate.prepare(self.tokenizer)
        self.reduction, self.chunk_size = reduction, chunk_size
        self.gradient_checkpointing = gradient_checkpointing
        self.max_nonfinite_steps, self.nonfinite_in_a_row, self.nonfinite_skipped = max_nonfinite_steps, 0, 0
        self.discard_gradients = False
        self.seed = seed
        self.verify_timeout, self.verifier = verify_timeout, None
        self.eos_ids = eos_token_ids(self.tokenizer)
        self.policy: CausalLMScorer | None = None
        self.teacher: CausalLMScorer | None = None
        self.buffer: RolloutBuffer | None = None
        self.generator: torch.Generator | None = None
        self.engine: RolloutEngine | None = None
        self.strict_loading = False
        self._step_started = 0.0

    # ----------------------------------------------------------------------------- models
    @property
    def student(self):
        return self.policy.model

    @property
    def prompt_template(self) -> PromptTemplate:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer else None
        return getattr(datamodule, "template", PromptTemplate())

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        student = load_causal_lm(self.student_path, self.dtype_name, "student")
        teacher = load_causal_lm(self.teacher_path, self.dtype_name, "teacher")
        for role, model in (("student", student), ("teacher", teacher)):
            rows = model.get_input_embeddings().weight.shape[0]
            if rows < len(self.tokenizer):
                raise ValueError(f"model.{role}: {rows} embedding rows < {len(self.tokenizer)} tokenizer tokens")
        if self.gradient_checkpointing:
            student.gradient_checkpointing_enable()
        teacher.requires_grad_(False).eval()
        self.policy = CausalLMScorer(student, self.chunk_size)
        self.teacher = CausalLMScorer(teacher, self.chunk_size)
        if self._trainer is not None and isinstance(self.trainer.strategy, (ModelParallelStrategy, FSDPStrategy)):
            self.shard_models()

    def shard_models(self) -> None:
        """FSDP2 (ModelParallelStrategy): `fully_shard` each decoder layer, then the scorer as the
        root (mixed precision from trainer.precision, `sharding.mixed_precision_policy`). FSDP1
        (FSDPStrategy): the scorer wrapped as its own root, decoder layers as units, with the
        strategy's settings. For the student and (`shard_teacher`) the teacher; a replicated
        teacher stays whole on every rank."""
        strategy = self.trainer.strategy
        if isinstance(strategy, FSDPStrategy):
            self.policy = wrap_scorer_fsdp1(self.policy, strategy)
            if self.shard_teacher:
                self.teacher = wrap_scorer_fsdp1(self.teacher, strategy)
            else:
                self.teacher.to(strategy.root_device)  # FSDPStrategy moves no module itself
        else:
            mesh, mp_policy = fsdp_mesh(self.device_mesh), mixed_precision_policy(self.trainer.precision)
            shard_scorer(self.policy, mesh, mp_policy)
            if self.shard_teacher:
                shard_scorer(self.teacher, mesh, mp_policy)
        # Sharded checkpoints load exactly the keys of the module's state dict, and checkpoints hold
        # no teacher (it is frozen and reloaded from model.teacher): keep it out of the state dict.
        self.register_state_dict_post_hook(drop_teacher_keys)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Under FSDP1, clipping by norm is the wrapped student's `clip_grad_norm_` (the norm of
        all shards), which Lightning's FSDP precision plugin does not do; otherwise Lightning's."""
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm") and isinstance(
                self.policy, FullyShardedDataParallel):
            self.policy.clip_grad_norm_(gradient_clip_val)
        else:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def save_student_pretrained(self, path: str) -> None:
        """Write the student and tokenizer as a plain HF checkpoint, sharded or not (every rank
        calls this; rank 0 writes)."""
        save_pretrained_full(self.policy, self.tokenizer, path, self.trainer.is_global_zero if self._trainer else True)

    def make_engine(self) -> RolloutEngine:
        if self.rollout.engine == "fast":
            from lit_opd.rollout.fast import StaticCacheEngine

            return StaticCacheEngine()
        return HFGenerateEngine()

    def setup(self, stage: str) -> None:
        self.engine = self.make_engine()
        if self.generator is None:
            self.generator = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + self.global_rank)
        if stage == "fit":
            steps = self.trainer.datamodule.schedule.num_minibatches if self.trainer.datamodule else 1
            if steps % self.trainer.accumulate_grad_batches:
                raise ValueError(
                    f"data.num_minibatches={steps} must be a multiple of "
                    f"trainer.accumulate_grad_batches={self.trainer.accumulate_grad_batches}"
                )

    def configure_optimizers(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params, lr=self.optim.lr, weight_decay=self.optim.weight_decay, betas=tuple(self.optim.betas)
        )
        warmup = max(self.optim.warmup_steps, 0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --------------------------------------------------------------------------- rollouts
    def generate_responses(
        self, prompt_ids: Tensor, prompt_mask: Tensor, sampling: SamplingConfig, generator: torch.Generator
    ) -> Generation:
        """Sample responses with the live student (eval mode, no grad). [B, P] → Generation."""
        was_training = self.student.training
        self.student.eval()
        try:
            with torch.no_grad(), gathered(self.policy):
                return self.engine.generate(
                    self.student, prompt_ids, prompt_mask, sampling, self.eos_ids, self.tokenizer.pad_token_id, generator
                )
        finally:
            self.student.train(was_training)

    def generate_teacher_responses(self, prompt_ids: Tensor, prompt_mask: Tensor) -> Generation:
        """Teacher rollouts with the student's sampling settings (phased teacher sampling)."""
        with torch.no_grad(), gathered(self.teacher):
            return self.engine.generate(self.teacher.model, prompt_ids, prompt_mask, self.rollout.sampling(),
                                        self.eos_ids, self.tokenizer.pad_token_id, self.generator)

    @torch.no_grad()
    def score(self, scorer: CausalLMScorer, rows: dict[str, Tensor], top_k: int = 0) -> dict[str, Tensor]:
        """No-grad log-probs of the response tokens of `rows`, in chunks of score_batch_size rows."""
        T = rows["response_ids"].shape[1]
        size = self.rollout.score_batch_size
        parts = [
            scorer(rows["input_ids"][i : i + size], rows["attention_mask"][i : i + size], T, top_k=top_k)
            for i in range(0, rows["input_ids"].shape[0], size)
        ]
        return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}

    def rollout_rows(self, batch: dict) -> tuple[dict[str, Tensor], list[str], Generation]:
        """Generate `num_samples` responses per prompt of `batch` and lay them out as rows."""
        n = self.rollout.num_samples
        prompt_ids = batch["prompt_ids"].repeat_interleave(n, dim=0)
        prompt_mask = batch["prompt_mask"].repeat_interleave(n, dim=0)
        answers = [a for a in batch["answers"] for _ in range(n)]
        generation = self.generate_responses(prompt_ids, prompt_mask, self.rollout.sampling(), self.generator)
        rows = {
            "input_ids": torch.cat([prompt_ids, generation.response_ids], dim=1),
            "attention_mask": torch.cat([prompt_mask, generation.response_mask], dim=1),
            "response_ids": generation.response_ids,
            "response_mask": generation.response_mask,
            "from_teacher": torch.zeros(prompt_ids.shape[0], dtype=torch.bool, device=prompt_ids.device),
        }
        return rows, answers, generation

    def verify_responses(self, response_ids: Tensor, response_mask: Tensor, answers: list[str]) -> Tensor:
        """bool [N]: does each decoded response's final answer equal its reference (time-bounded
        math-verify in a process pool; a hung or crashed check counts as wrong)."""
        if self.verifier is None:
            from lit_opd.verify import Verifier, available_cpus

            workers = max(1, available_cpus() // max(self.trainer.num_devices, 1))
            self.verifier = Verifier(num_workers=workers, timeout=self.verify_timeout)
        texts = self.tokenizer.batch_decode(response_ids.masked_fill(~response_mask, self.tokenizer.pad_token_id),
                                            skip_special_tokens=True)
        return torch.tensor(self.verifier.verify_batch(texts, answers), dtype=torch.bool, device=response_ids.device)

    def mix_rollouts(self, batch: dict, rows: dict[str, Tensor], answers: list[str]) -> dict[str, Tensor]:
        """Let rollout callbacks (PhasedTeacherSampling) replace rows before scoring."""
        from lit_opd.callbacks.phased_teacher import PhasedTeacherSampling

        for callback in self.trainer.callbacks:
            if isinstance(callback, PhasedTeacherSampling):
                rows = callback.mix_rollouts(self, batch, rows, answers)
        return rows

    def fill_buffer(self, batch: dict) -> None:
        """Generate, score (behavior and teacher log-probs, once) and split a rollout batch."""
        t0 = time.perf_counter()
        rows, answers, generation = self.rollout_rows(batch)
        t1 = time.perf_counter()
        if self.needs_verdicts:
            rows["correct"] = self.verify_responses(rows["response_ids"], rows["response_mask"], answers)
        rows = self.mix_rollouts(batch, rows, answers)
        verified = time.perf_counter()
        order = torch.randperm(rows["input_ids"].shape[0], generator=self.generator)
        minibatches = split_rows(rows, order, batch["num_minibatches"])
        t2 = time.perf_counter()
        for mb in minibatches:
            mb["old_logp"] = self.score(self.policy, mb)["logp"]
        t3 = time.perf_counter()
        for mb in minibatches:
            teacher = self.score(self.teacher, mb, self.teacher_top_k)
            mb["teacher_logp"] = teacher["logp"]
            if self.teacher_top_k:
                mb["teacher_topk_logp"], mb["teacher_topk_ids"] = teacher["topk_logp"], teacher["topk_ids"]
        t4 = time.perf_counter()
        generated = generation.response_mask.sum().item()
        self.buffer = RolloutBuffer(
            rollout_index=batch["rollout_index"],
            minibatches=minibatches,
            normalizers=self.normalizers(minibatches),
            stats={
                "perf/generate_s": t1 - t0,
                "perf/tokens_per_s": generated / max(t1 - t0, 1e-9),
                "perf/verify_s": verified - t1,
                "perf/old_logp_s": t3 - t2,
                "perf/teacher_s": t4 - t3,
                "train/response_length": generated / generation.response_mask.shape[0],
            },
        )
        if "correct" in rows:
            self.buffer.stats["train/verifier_accuracy"] = rows["correct"].float().mean().item()
        if self.verifier is not None:
            self.buffer.stats["train/verifier_timeouts"] = float(self.verifier.stats.timeouts)
            self.buffer.stats["train/verifier_crashes"] = float(self.verifier.stats.crashes)

    def normalizers(self, minibatches: list[dict[str, Tensor]]) -> list[float]:
        """Per mini-batch: the global count (tokens or sequences) of its optimiser step divided by
        accumulate_grad_batches × world size, so that Lightning's 1/accumulate scaling and the
        ranks' gradient averaging give Σ g m ℓ / (global count) exactly."""
        masks = [mb["response_mask"] for mb in minibatches]
        if self.reduction == "token_mean":
            counts = torch.stack([m.sum() for m in masks]).double()
        else:
            counts = torch.stack([(m.sum(dim=1) > 0).sum() for m in masks]).double()
        counts = self.all_reduce_sum(counts)
        accumulate = self.trainer.accumulate_grad_batches
        windows = counts.view(-1, accumulate).sum(dim=1).repeat_interleave(accumulate)
        return (windows / (accumulate * self.trainer.world_size)).tolist()

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            tensor = tensor.to(self.device)
            torch.distributed.all_reduce(tensor)
        return tensor.cpu()

    # ------------------------------------------------------------------------------ losses
    def student_scores(self, mb: dict[str, Tensor]) -> dict[str, Tensor]:
        """log π_θ of the sampled tokens (and of the teacher's support, where the loss needs it)."""
        support = mb.get("teacher_topk_ids")
        return self.policy(mb["input_ids"], mb["attention_mask"], mb["response_ids"].shape[1], support=support)

    def per_token_loss(self, mb: dict[str, Tensor], scores: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    @staticmethod
    def response_logprobs(mb: dict[str, Tensor], scores: dict[str, Tensor]) -> dict[str, Tensor]:
        """The log-probs (and GKD's teacher hidden states) a step uses, at response positions,
        under the names a warning gives them."""
        mask = mb["response_mask"]
        named = {
            "student log-probs": scores["logp"],
            "student support log-probs": scores.get("support_logp"),
            "behavior log-probs": mb["old_logp"],
            "teacher log-probs": mb["teacher_logp"],
            "teacher top-K log-probs": mb.get("teacher_topk_logp"),
            "teacher hidden states": scores.get("teacher_hidden"),
        }
        return {name: value[mask] for name, value in named.items() if value is not None}

    def nonfinite(self, named: dict[str, Tensor]) -> list[str]:
        """The names whose tensor holds a NaN or ±inf on some rank (a collective: every rank calls
        it with the same names)."""
        flags = torch.stack([(~torch.isfinite(t.detach())).any().cpu() for t in named.values()]).double()
        return [name for name, flag in zip(named, self.all_reduce_sum(flags).tolist()) if flag]

    def skip_nonfinite(self, reason: str) -> None:
        """Count a skipped step (its gradients are discarded in `on_before_optimizer_step`), warn,
        and stop the run after model.max_nonfinite_steps skips with no optimiser step between."""
        self.nonfinite_in_a_row += 1
        self.nonfinite_skipped += 1
        self.discard_gradients = True
        rank_zero_warn(f"step {self.global_step}: {reason}; skipping this step "
                       f"({self.nonfinite_in_a_row} in a row, limit {self.max_nonfinite_steps})")
        if self.nonfinite_in_a_row >= self.max_nonfinite_steps:
            raise RuntimeError(
                f"{self.nonfinite_in_a_row} steps in a row skipped for non-finite values, the last: {reason} "
                f"(model.max_nonfinite_steps={self.max_nonfinite_steps}): stopping the run"
            )

    def on_before_optimizer_step(self, optimizer) -> None:
        """Discard the gradients of a step that skipped a micro-batch or whose gradients are not
        finite (all ranks agree), so that neither the weights nor the optimiser's moments move. A
        skipped step still counts as a step (global step, LR schedule, data position). Under fp16's
        GradScaler the scaler skips steps with non-finite gradients itself."""
        if not self.discard_gradients and getattr(self.trainer.precision_plugin, "scaler", None) is None:
            grads = [p.grad for p in self.policy.parameters() if p.grad is not None]
            norms = [torch.linalg.vector_norm(g.to_local() if isinstance(g, DTensor) else g, dtype=torch.float32)
                     for g in grads]
            if self.nonfinite({"gradients": torch.stack(norms) if norms else torch.zeros(0)}):
                self.skip_nonfinite(f"non-finite gradients at optimiser step {self.global_step}")
        if self.discard_gradients:
            optimizer.zero_grad(set_to_none=True)
            self.discard_gradients = False
        else:
            self.nonfinite_in_a_row = 0

    def training_step(self, batch: dict, batch_idx: int):
        self._step_started = time.perf_counter()
        if self.buffer is None or self.buffer.rollout_index != batch["rollout_index"]:
            if batch["minibatch_index"] or batch["reuse_index"]:
                held = None if self.buffer is None else self.buffer.rollout_index
                raise RuntimeError(
                    f"the data opens rollout batch {batch['rollout_index']} at mini-batch {batch['minibatch_index']}, "
                    f"reuse {batch['reuse_index']}, but the rollout buffer holds rollout batch {held}: the data "
                    f"position and the buffer of a resumed run disagree"
                )
            self.fill_buffer(batch)
            self.log_dict(self.buffer.stats)
        mb = {k: v.to(self.device) for k, v in self.buffer.minibatches[batch["minibatch_index"]].items()}
        scores = self.student_scores(mb)
        where = f"rollout batch {batch['rollout_index']}, mini-batch {batch['minibatch_index']}"
        if bad := self.nonfinite(self.response_logprobs(mb, scores)):
            self.skip_nonfinite(f"non-finite {' and '.join(bad)} ({where})")
            # Every rank runs the same backward (DDP/FSDP collectives); its gradients are discarded.
            return scores["logp"].sum() * 0.0
        mask = mb["response_mask"]
        gates = [gate(mb, scores["logp"]) for gate in self.gates]
        position_loss = self.per_token_loss(mb, scores)
        loss = gated_reduce(
            position_loss, gates, mask, self.reduction, self.buffer.normalizers[batch["minibatch_index"]]
        )
        if self.nonfinite({"loss": loss}):
            self.skip_nonfinite(f"non-finite loss ({where})")
            return scores["logp"].sum() * 0.0
        self.log_training(mb, scores, gates, position_loss, batch["reuse_index"])
        return loss

    def log_training(self, mb, scores, gates, position_loss, reuse_index) -> None:
        """Scalars of this mini-batch (local means) and the gate histogram."""
        mask = mb["response_mask"]
        logp = scores["logp"].detach()
        gate = torch.ones_like(logp)
        for g in gates:
            gate = gate * g
        valid = gate[mask]
        self.log_dict(
            {
                "train/loss": gated_reduce(position_loss.detach(), gates, mask, self.reduction),
                "train/drift_abs_mean": masked_mean((logp - mb["old_logp"]).abs(), mask),
                "train/reverse_kl": masked_mean(logp - mb["teacher_logp"], mask),
                "train/gate_mean": valid.mean(),
                "train/gate_min": valid.min(),
                "train/gate_max": valid.max(),
                "train/reuse_index": float(reuse_index),
            },
            prog_bar=False,
        )
        experiment = getattr(self.logger, "experiment", None)
        if gates and hasattr(experiment, "add_histogram"):
            experiment.add_histogram("train/gate", valid.float().cpu(), self.global_step)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.log("perf/student_s", time.perf_counter() - self._step_started)
        self.log("train/nonfinite_skipped", float(self.nonfinite_skipped))

    # ------------------------------------------------------------------- validate / test
    def validation_step(self, batch, batch_idx) -> None:
        """No-op: `validate`/`test` run the PassAtKEvaluation callback on benchmarks."""

    def test_step(self, batch, batch_idx) -> None:
        """No-op: see `validation_step`."""

    # -------------------------------------------------------------------------- checkpoint
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.")}
        rank_state = {
            "buffer": self.buffer.state_dict() if self.buffer is not None else None,
            "generator": self.generator.get_state() if self.generator is not None else None,
        }
        checkpoint["lit_opd"] = {
            "layout": resume_layout(self, self.trainer.datamodule, self.trainer),
            "ranks": gather_rank_states(rank_state),
            "nonfinite_skipped": self.nonfinite_skipped,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Resuming a fit: refuse a checkpoint whose rollout buffer and data position this run's
        settings would misread, then restore this rank's buffer and sampling generator."""
        state = checkpoint.get("lit_opd")
        if state is None or self._trainer is None or self.trainer.state.fn != TrainerFn.FITTING:
            return
        current = resume_layout(self, self.trainer.datamodule, self.trainer)
        check_resume_layout(state["layout"], current, str(self.trainer.ckpt_path))
        mine = state["ranks"][self.global_rank]
        if mine["buffer"] is not None:
            self.buffer = RolloutBuffer.from_state_dict(mine["buffer"], torch.device("cpu"))
        if mine["generator"] is not None:
            self.generator = torch.Generator(device="cpu")
            self.generator.set_state(mine["generator"])
        self.nonfinite_skipped, self.nonfinite_in_a_row = state["nonfinite_skipped"], state["nonfinite_in_a_row"]
        rank_zero_info("restored the rollout buffer and sampling generator from the checkpoint")
