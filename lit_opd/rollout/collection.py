"""Rollout collection: one rollout batch from prompts to scored mini-batches.

generate (the live student, `num_samples` per prompt) → verify (when verdicts are needed) → mix
teacher rollouts (phased teacher sampling) → split into mini-batches → score (behaviour
log-probs of the student, teacher log-probs and top-K) once per rollout batch. A teacher that
scores while the student generates (a server) scores each engine call's rows as soon as they
are generated, in a thread, and the rows phased teacher sampling replaces after the mix.

With several processes, a failure on one rank must not send it to a collective the others do not
make: each stage that can fail on its own rank (generation, verification, the mix, waiting on the
teacher) is `settled` — every rank learns whether any failed before the next collective.
"""

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import TypeVar

import torch
from torch import Tensor, nn

from lit_opd.data.templates import eos_token_ids
from lit_opd.rollout.buffer import split_rows
from lit_opd.rollout.engine import Generation, RolloutEngine, SamplingConfig, ended
from lit_opd.rollout.generation import generate_rows
from lit_opd.rollout.scoring import ScoringSettings, score_rows
from lit_opd.rollout.settings import RolloutConfig
from lit_opd.rollout.teacher_engines import TeacherEngine
from lit_opd.rollout.teacher_sampling import PhasedTeacherSampling, pad_columns
from lit_opd.verify import Verifier

T = TypeVar("T")


class CollectionFailed(RuntimeError):
    """Collecting a rollout batch failed on this rank (the cause is chained) or on another."""


def settle(any_failed: Callable[[bool], bool], work: Callable[[], T]) -> T:
    """work()'s result, once every rank knows whether its own work failed: `any_failed(flag)` is
    True on every rank if the flag is on any (an all-reduce in a run of several processes; the flag
    itself in one). Then every rank raises `CollectionFailed` together, before the collectives that
    follow. A collective: every rank calls it as often."""
    try:
        result, error = work(), None
    except Exception as caught:
        result, error = None, caught
    if any_failed(error is not None):
        raise CollectionFailed(one_line(error)) from error
    return result


def one_line(error: BaseException | None) -> str:
    """"<type>: <first line of its message>" of this rank's error (None: another rank's)."""
    if error is None:
        return "collecting the rollout batch failed on another rank"
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


class RolloutCollector:
    """Collects rollout batches with `rollout`'s settings, from objects the module builds.

    engine: the student's rollout engine; teacher: the teacher, wherever it runs (`TeacherEngine`);
    scoring: the teacher's support (top_k, exclude) and the forwards' sizes (`ScoringSettings`);
    verifier: gives every row a verdict `correct` (None: no verdicts; rollout.teacher_phases needs
    them). The collector closes what it is handed.
    """

    def __init__(self, rollout: RolloutConfig, tokenizer, engine: RolloutEngine, teacher: TeacherEngine,
                 scoring: ScoringSettings, verifier: Verifier | None = None):
        self.rollout, self.tokenizer, self.engine, self.teacher = rollout, tokenizer, engine, teacher
        self.scoring, self.verifier = scoring, verifier
        self.eos_ids = eos_token_ids(tokenizer)
        self.phases = PhasedTeacherSampling(rollout.teacher_phases) if rollout.teacher_phases else None

    def close(self) -> None:
        if self.verifier is not None:
            self.verifier.close()
        self.engine.close()
        self.teacher.close()

    def generate(
        self, scorer: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, sampling: SamplingConfig,
        generator: torch.Generator,
    ) -> Generation:
        """Sample responses with the student `scorer` through the rollout engine, at most
        rollout.generate_batch_size rows a call (`generation.generate_rows`). [B, P] → Generation."""
        return generate_rows(self.engine, scorer, prompt_ids, prompt_mask, sampling, self.eos_ids,
                             self.tokenizer.pad_token_id, generator, self.rollout.generate_batch_size)

    def verify(self, response_ids: Tensor, response_mask: Tensor, answers: list[str]) -> Tensor:
        """bool [N]: did each response end (an EOS id under its mask) with a final answer equal to
        its reference (in \\boxed{}, or the last number with rollout.answer_fallback; time-bounded
        math-verify in a process pool; a hung or crashed check counts as wrong)."""
        texts = self.tokenizer.batch_decode(response_ids.masked_fill(~response_mask, self.tokenizer.pad_token_id),
                                            skip_special_tokens=True)
        verdicts = self.verifier.verify_batch(texts, answers, fallback=self.rollout.answer_fallback)
        return torch.tensor(verdicts, dtype=torch.bool, device=response_ids.device) & ended(
            response_ids, response_mask, self.eos_ids)

    def rollout_rows(self, batch: dict, policy: nn.Module, generator: torch.Generator,
                     on_part: Callable[[int, dict[str, Tensor]], None] | None = None):
        """`num_samples` student responses per prompt of `batch`, laid out as rows: (rows,
        reference answers per row, the generation). `on_part(first row, rows)` is handed the rows of
        each engine call as soon as they are generated."""
        n = self.rollout.num_samples
        prompt_ids = batch["prompt_ids"].repeat_interleave(n, dim=0)
        prompt_mask = batch["prompt_mask"].repeat_interleave(n, dim=0)
        answers = [a for a in batch["answers"] for _ in range(n)]

        def part_rows(first: int, part: Generation) -> None:
            rows = slice(first, first + part.response_ids.shape[0])
            ids, mask = prompt_ids[rows], prompt_mask[rows]
            on_part(first, {"input_ids": torch.cat([ids, part.response_ids], dim=1),
                            "attention_mask": torch.cat([mask, part.response_mask], dim=1),
                            "response_ids": part.response_ids, "response_mask": part.response_mask})

        generation = generate_rows(self.engine, policy, prompt_ids, prompt_mask, self.rollout.sampling(), self.eos_ids,
                                   self.tokenizer.pad_token_id, generator, self.rollout.generate_batch_size,
                                   part_rows if on_part is not None else None)
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
        self, batch: dict, step: int, policy: nn.Module, generator: torch.Generator,
        any_failed: Callable[[bool], bool] = bool,
    ) -> tuple[list[dict[str, Tensor]], dict[str, float]]:
        """The rollout batch of `batch` (opened at global step `step`) as `batch["num_minibatches"]`
        scored mini-batches, and the statistics to log once (timings, lengths, verdicts).
        `any_failed(flag)`: is the flag on on any rank (`settle`); a failure raises
        `CollectionFailed` on every rank."""
        early = self.teacher.scores_while_generating
        pool = ThreadPoolExecutor(1, thread_name_prefix="teacher-scoring") if early else None
        scoring: list[tuple[int, Future]] = []
        try:
            t0 = time.perf_counter()
            on_part = (lambda first, rows: scoring.append((first, pool.submit(self.score_teacher, rows)))) if early else None
            rows, answers, generation = settle(any_failed, lambda: self.rollout_rows(batch, policy, generator, on_part))
            t1 = time.perf_counter()
            stats = {}
            if self.verifier is not None:
                rows["correct"] = settle(any_failed, lambda: self.verify(rows["response_ids"], rows["response_mask"],
                                                                          answers))
            if self.phases is not None:
                rows, stats = settle(any_failed, lambda: self.mix(step, batch, rows, generator))
            verified = time.perf_counter()
            if early:  # the student's rows scored while generating; the rows the mix replaced now
                rows |= settle(any_failed, lambda: self.gather_teacher_scores(rows, scoring))
        finally:
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        t_scored = time.perf_counter()
        order = torch.randperm(rows["input_ids"].shape[0], generator=generator)
        minibatches = split_rows(rows, order, batch["num_minibatches"])
        t2 = time.perf_counter()
        for mb in minibatches[1:]:  # the first mini-batch's are its training forward's (`DistillationModule`)
            mb["old_logp"] = score_rows(policy, mb, self.scoring)["logp"]
        t3 = time.perf_counter()
        for mb in minibatches if not early else []:
            mb |= self.score_teacher(mb)
        t4 = time.perf_counter()
        generated = generation.response_mask.sum().item()
        stats |= {
            "perf/generate_s": t1 - t0,
            "perf/tokens_per_s": generated / max(t1 - t0, 1e-9),
            "perf/verify_s": verified - t1,
            "perf/old_logp_s": t3 - t2,
            "perf/teacher_s": t4 - t3 + t_scored - verified,  # scoring beside generation: the wait after it
            "train/response_length": generated / generation.response_mask.shape[0],
        }
        if "correct" in rows:
            stats["train/verifier_accuracy"] = rows["correct"].float().mean().item()
        if self.verifier is not None:
            stats["train/verifier_timeouts"] = float(self.verifier.stats.timeouts)
            stats["train/verifier_crashes"] = float(self.verifier.stats.crashes)
        return minibatches, stats

    def mix(self, step: int, batch: dict, rows: dict[str, Tensor], generator: torch.Generator):
        """Phased teacher sampling's mix (`PhasedTeacherSampling.mix`): (rows, statistics)."""
        generate_teacher = partial(self.teacher.generate, sampling=self.rollout.sampling(), eos_token_ids=self.eos_ids,
                                   pad_token_id=self.tokenizer.pad_token_id, generator=generator)
        rows, stats = self.phases.mix(step, batch, rows, self.rollout.num_samples, generator, generate_teacher,
                                      self.verify, self.tokenizer.pad_token_id)
        if "rollout_logp" in rows:  # the mixed rows may be wider; teacher rows' values are not used
            rows["rollout_logp"] = pad_columns(rows["rollout_logp"], rows["response_ids"].shape[1], 0.0)
        return rows, stats

    def score_teacher(self, rows: dict[str, Tensor]) -> dict[str, Tensor]:
        """The teacher's scores of `rows`' responses under the keys a mini-batch holds them:
        teacher_logp [N, T] (and teacher_topk_logp, teacher_topk_ids [N, T, K] with a top-K)."""
        scores = self.teacher.score(rows, self.scoring.top_k, set(self.scoring.exclude))
        out = {"teacher_logp": scores["logp"]}
        if self.scoring.top_k:
            out |= {"teacher_topk_logp": scores["topk_logp"], "teacher_topk_ids": scores["topk_ids"]}
        return out

    def gather_teacher_scores(self, rows: dict[str, Tensor], scoring: list[tuple[int, Future]]) -> dict[str, Tensor]:
        """The teacher's scores of every row of `rows` ([N, T] after the mix), from those of the
        generated parts (first row, future of `score_teacher`), each right-padded to T with zeros
        (what scoring all rows at once gives off the mask); rows the mix replaced
        (`from_teacher`) are scored now."""
        T = rows["response_ids"].shape[1]
        parts = [future.result() for _, future in sorted(scoring, key=lambda item: item[0])]
        out = {key: torch.cat([pad_columns(part[key], T, 0) for part in parts]) for key in parts[0]}
        replaced = rows["from_teacher"].nonzero().flatten()
        if len(replaced):
            keys = ("input_ids", "attention_mask", "response_ids", "response_mask")
            for key, value in self.score_teacher({k: rows[k][replaced] for k in keys}).items():
                out[key][replaced.to(out[key].device)] = pad_columns(value, T, 0)
        return out
