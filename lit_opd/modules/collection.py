"""Rollout collection: one rollout batch from prompts to scored mini-batches.

generate (the live student, `num_samples` per prompt) → verify (when verdicts are needed) → mix
teacher rollouts (phased teacher sampling) → split into mini-batches → score (behaviour
log-probs of the student, teacher log-probs and top-K) once per rollout batch.
"""

import time
from contextlib import nullcontext
from functools import partial

import torch
from torch import Tensor

from lit_opd.data.templates import eos_token_ids
from lit_opd.logprobs import CausalLMScorer
from lit_opd.modules.micro_batches import scatter_rows, step_micro_batches, take_micro_batch
from lit_opd.modules.settings import RolloutConfig
from lit_opd.modules.teacher_sampling import PhasedTeacherSampling, pad_columns
from lit_opd.rollout.buffer import split_rows
from lit_opd.rollout.engine import Generation, SamplingConfig, build_engine, ended
from lit_opd.rollout.teacher_engines import TeacherEngine
from lit_opd.sharding import gathered
from lit_opd.verify import Verifier


def concat_generations(parts: list[Generation], pad_token_id: int) -> Generation:
    """The rows of several Generations, right-padded to the longest response (pad id, mask False, log-prob 0)."""
    T = max(part.response_ids.shape[1] for part in parts)

    def cat(name: str, fill) -> Tensor | None:
        values = [getattr(part, name) for part in parts]
        if any(value is None for value in values):
            return None
        return torch.cat([pad_columns(value, T, fill) for value in values])

    return Generation(cat("response_ids", pad_token_id), cat("response_mask", False), cat("logp", 0.0),
                      cat("sample_logp", 0.0))


class RolloutCollector:
    """Collects rollout batches with `rollout`'s settings.

    teacher_top_k: the support size the teacher's scoring returns (0: none); support_exclude:
    token ids never in that support. verdicts: whether every row gets a verifier verdict
    `correct` (also on with rollout.verify or rollout.teacher_phases). verify_workers: verifier
    processes (started on first use). micro_batch_tokens: scoring forwards within this padded
    token budget (`micro_batches.cut_rows`; 0: rollout.score_batch_size rows at a time).
    model_path: the student's files, from which the vllm engine is built.
    """

    def __init__(self, rollout: RolloutConfig, tokenizer, teacher_top_k: int, verdicts: bool, verify_workers: int,
                 support_exclude: list[int] = (), micro_batch_tokens: int = 0, model_path: str | None = None):
        self.rollout, self.tokenizer, self.teacher_top_k = rollout, tokenizer, teacher_top_k
        self.support_exclude = torch.tensor(sorted(support_exclude), dtype=torch.long)
        self.micro_batch_tokens = micro_batch_tokens
        self.eos_ids = eos_token_ids(tokenizer)
        self.engine = build_engine(rollout.engine, model_path, rollout.vllm)
        self.phases = PhasedTeacherSampling(rollout.teacher_phases) if rollout.teacher_phases else None
        self.verdicts = verdicts or rollout.verify or self.phases is not None
        self.verify_workers = verify_workers
        self.verifier: Verifier | None = None

    def close(self) -> None:
        if self.verifier is not None:
            self.verifier.close()
        self.engine.close()

    def generate(
        self, scorer: CausalLMScorer, prompt_ids: Tensor, prompt_mask: Tensor, sampling: SamplingConfig,
        generator: torch.Generator,
    ) -> Generation:
        """Sample responses with `scorer`'s model in eval mode, at most rollout.generate_batch_size
        rows per engine call (its KV cache). A paged engine (vLLM) takes every row and the weights
        one tensor at a time; the others run the model itself, gathered if sharded. [B, P] → Generation."""
        model = scorer.model
        was_training = model.training
        model.eval()
        size = prompt_ids.shape[0] if self.engine.paged else self.rollout.generate_batch_size or prompt_ids.shape[0]
        try:
            with torch.no_grad(), nullcontext() if self.engine.paged else gathered(scorer):
                parts = [self.engine.generate(model, prompt_ids[i : i + size], prompt_mask[i : i + size], sampling,
                                              self.eos_ids, self.tokenizer.pad_token_id, generator)
                         for i in range(0, prompt_ids.shape[0], size)]
        finally:
            model.train(was_training)
        return parts[0] if len(parts) == 1 else concat_generations(parts, self.tokenizer.pad_token_id)

    def verify(self, response_ids: Tensor, response_mask: Tensor, answers: list[str]) -> Tensor:
        """bool [N]: did each response end (an EOS id under its mask) with a final answer equal to
        its reference (in \\boxed{}, or the last number with rollout.answer_fallback; time-bounded
        math-verify in a process pool; a hung or crashed check counts as wrong)."""
        if self.verifier is None:
            self.verifier = Verifier(num_workers=self.verify_workers, timeout=self.rollout.verify_timeout)
        texts = self.tokenizer.batch_decode(response_ids.masked_fill(~response_mask, self.tokenizer.pad_token_id),
                                            skip_special_tokens=True)
        verdicts = self.verifier.verify_batch(texts, answers, fallback=self.rollout.answer_fallback)
        return torch.tensor(verdicts, dtype=torch.bool, device=response_ids.device) & ended(
            response_ids, response_mask, self.eos_ids)

    @torch.no_grad()
    def score(self, scorer: CausalLMScorer, rows: dict[str, Tensor], top_k: int = 0) -> dict[str, Tensor]:
        """No-grad log-probs of the response tokens of `rows` (and the top-K outside
        support_exclude), in chunks of score_batch_size rows."""
        exclude = self.support_exclude if top_k and len(self.support_exclude) else None
        if self.micro_batch_tokens > 0:
            return self.score_micro_batches(scorer, rows, top_k, exclude)
        T = rows["response_ids"].shape[1]
        size = self.rollout.score_batch_size
        parts = [
            scorer(rows["input_ids"][i : i + size], rows["attention_mask"][i : i + size], T, top_k=top_k, exclude=exclude)
            for i in range(0, rows["input_ids"].shape[0], size)
        ]
        return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}

    def score_micro_batches(self, scorer, rows: dict[str, Tensor], top_k: int, exclude) -> dict[str, Tensor]:
        """`score` in micro-batches of micro_batch_tokens padded tokens (the same count on every rank)."""
        N, T = rows["response_ids"].shape
        out = {}
        for part in step_micro_batches(rows, self.micro_batch_tokens, rows["response_ids"].device):
            micro = take_micro_batch(rows, part)
            scores = scorer(micro["input_ids"], micro["attention_mask"], micro["response_ids"].shape[1], top_k=top_k,
                            exclude=exclude)
            for key, value in scores.items():
                full = out.setdefault(key, value.new_zeros(N, T, *value.shape[2:]))
                scatter_rows(full, part, value)
        return out

    def score_teacher(self, teacher, rows: dict[str, Tensor]) -> dict[str, Tensor]:
        """The teacher's log-probs of `rows`' responses (and its top-K support): in the trainer
        (`score`), or by a teacher engine outside it, all rows at once."""
        if isinstance(teacher, TeacherEngine):
            return teacher.score(rows, self.teacher_top_k, set(self.support_exclude.tolist()))
        return self.score(teacher, rows, self.teacher_top_k)

    def generate_teacher(self, teacher, prompt_ids: Tensor, prompt_mask: Tensor, generator: torch.Generator) -> Generation:
        """Teacher rollouts (phased teacher sampling), in the trainer or by its engine outside it."""
        if isinstance(teacher, TeacherEngine):
            return teacher.generate(prompt_ids, prompt_mask, self.rollout.sampling(), self.eos_ids,
                                    self.tokenizer.pad_token_id, generator)
        return self.generate(teacher, prompt_ids, prompt_mask, self.rollout.sampling(), generator)

    def rollout_rows(self, batch: dict, policy: CausalLMScorer, generator: torch.Generator):
        """`num_samples` student responses per prompt of `batch`, laid out as rows: (rows,
        reference answers per row, the generation)."""
        n = self.rollout.num_samples
        prompt_ids = batch["prompt_ids"].repeat_interleave(n, dim=0)
        prompt_mask = batch["prompt_mask"].repeat_interleave(n, dim=0)
        answers = [a for a in batch["answers"] for _ in range(n)]
        generation = self.generate(policy, prompt_ids, prompt_mask, self.rollout.sampling(), generator)
        rows = {
            "input_ids": torch.cat([prompt_ids, generation.response_ids], dim=1),
            "attention_mask": torch.cat([prompt_mask, generation.response_mask], dim=1),
            "response_ids": generation.response_ids,
            "response_mask": generation.response_mask,
            "from_teacher": torch.zeros(prompt_ids.shape[0], dtype=torch.bool, device=prompt_ids.device),
        }
        if self.rollout.engine == "vllm":  # rollout/logp_mismatch and the truncated importance weight
            rows["rollout_logp"] = generation.logp
        return rows, answers, generation

    def collect(
        self, batch: dict, step: int, policy: CausalLMScorer, teacher: CausalLMScorer, generator: torch.Generator
    ) -> tuple[list[dict[str, Tensor]], dict[str, float]]:
        """The rollout batch of `batch` (opened at global step `step`) as `batch["num_minibatches"]`
        scored mini-batches, and the statistics to log once (timings, lengths, verdicts)."""
        t0 = time.perf_counter()
        rows, answers, generation = self.rollout_rows(batch, policy, generator)
        t1 = time.perf_counter()
        stats = {}
        if self.verdicts:
            rows["correct"] = self.verify(rows["response_ids"], rows["response_mask"], answers)
        if self.phases is not None:
            generate_teacher = partial(self.generate_teacher, teacher, generator=generator)
            rows, stats = self.phases.mix(step, batch, rows, self.rollout.num_samples, generator, generate_teacher,
                                          self.verify, self.tokenizer.pad_token_id)
            if "rollout_logp" in rows:  # the mixed rows may be wider; teacher rows' values are not used
                rows["rollout_logp"] = pad_columns(rows["rollout_logp"], rows["response_ids"].shape[1], 0.0)
        verified = time.perf_counter()
        order = torch.randperm(rows["input_ids"].shape[0], generator=generator)
        minibatches = split_rows(rows, order, batch["num_minibatches"])
        t2 = time.perf_counter()
        for mb in minibatches[1:]:  # the first mini-batch's are its training forward's (`DistillationModule`)
            mb["old_logp"] = self.score(policy, mb)["logp"]
        t3 = time.perf_counter()
        for mb in minibatches:
            scores = self.score_teacher(teacher, mb)
            mb["teacher_logp"] = scores["logp"]
            if self.teacher_top_k:
                mb["teacher_topk_logp"], mb["teacher_topk_ids"] = scores["topk_logp"], scores["topk_ids"]
        t4 = time.perf_counter()
        generated = generation.response_mask.sum().item()
        stats |= {
            "perf/generate_s": t1 - t0,
            "perf/tokens_per_s": generated / max(t1 - t0, 1e-9),
            "perf/verify_s": verified - t1,
            "perf/old_logp_s": t3 - t2,
            "perf/teacher_s": t4 - t3,
            "train/response_length": generated / generation.response_mask.shape[0],
        }
        if "correct" in rows:
            stats["train/verifier_accuracy"] = rows["correct"].float().mean().item()
        if self.verifier is not None:
            stats["train/verifier_timeouts"] = float(self.verifier.stats.timeouts)
            stats["train/verifier_crashes"] = float(self.verifier.stats.crashes)
        return minibatches, stats
