"""pass@k evaluation of a policy on math problems, without Lightning.

`evaluate` samples n responses per problem, verifies them and returns one `ProblemResult` per
problem; `PassAtKMetric` sums those results in torchmetrics states, so that `compute()` gives
the same numbers on one rank or many (each rank evaluates a shard of the problems).
"""

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from lit_opd.data.benchmarks import Problem
from lit_opd.data.templates import PromptTemplate, eos_token_ids
from lit_opd.metrics import pass_at_k
from lit_opd.rollout.engine import Generation, HFGenerateEngine, RolloutEngine, SamplingConfig, ended
from lit_opd.verify import Verifier, answer_from_fallback, extract_answer

# (prompt_ids [B, P], prompt_mask [B, P] bool, left-padded; sampling; generator) → Generation
GenerateFn = Callable[[Tensor, Tensor, SamplingConfig, torch.Generator], Generation]


@dataclass
class ProblemResult:
    """n sampled responses to one problem and their verdicts.

    response_lengths: tokens of each response (EOS included); truncated: responses that hit
    max_new_tokens without an end token; extracted: each response's final answer (None: none);
    fallback_answers: answers taken from the last number, for want of a \\boxed{}."""

    id: str
    reference: str
    correct: list[bool]
    pass_at_k: dict[int, float]
    response_lengths: list[int]
    truncated: int
    responses: list[str]
    extracted: list[str | None]
    fallback_answers: int = 0

    @property
    def n(self) -> int:
        return len(self.correct)

    @property
    def num_correct(self) -> int:
        return sum(self.correct)

    def to_row(self, with_responses: bool = True) -> dict:
        """A JSON-able dict: the audit trail of this problem in an evaluation's JSONL file."""
        row = {
            "id": self.id,
            "reference": self.reference,
            "n": self.n,
            "num_correct": self.num_correct,
            **{f"pass@{k}": value for k, value in self.pass_at_k.items()},
            "mean_response_length": sum(self.response_lengths) / self.n,
            "truncated": self.truncated,
            "fallback_answers": self.fallback_answers,
            "extracted": self.extracted,
            "correct": self.correct,
        }
        if with_responses:
            row["responses"] = self.responses
        return row


def model_generate_fn(model: nn.Module, tokenizer: PreTrainedTokenizerBase, engine: RolloutEngine | None = None) -> GenerateFn:
    """A GenerateFn that samples from `model` (eval mode, no grad) with `engine` (default HF generate)."""
    engine = engine or HFGenerateEngine()
    eos_ids = eos_token_ids(tokenizer)

    def generate(prompt_ids: Tensor, prompt_mask: Tensor, sampling: SamplingConfig, generator: torch.Generator):
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return engine.generate(model, prompt_ids, prompt_mask, sampling, eos_ids, tokenizer.pad_token_id, generator)
        finally:
            model.train(was_training)

    return generate


def evaluate(
    problems: Sequence[Problem],
    generate: GenerateFn,
    tokenizer: PreTrainedTokenizerBase,
    template: PromptTemplate,
    sampling: SamplingConfig,
    n: int,
    ks: Sequence[int],
    generator: torch.Generator,
    verifier: Verifier,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    progress: bool = True,
    description: str = "pass@k",
) -> list[ProblemResult]:
    """Sample n responses per problem and verify them: one ProblemResult per problem, in order.

    Prompts are rendered with `template`, tokenised left-padded, and generated `batch_size`
    responses (rows) at a time; the problems × n rows are cut into batches in order, so the
    number of `generate` calls depends only on len(problems), n and batch_size. Responses are
    verified on the verifier's worker processes while the next batch generates.
    """
    if any(not 1 <= k <= n for k in ks):
        raise ValueError(f"every k must be in [1, n={n}], got ks={list(ks)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    prompts = [template.render(tokenizer, problem.problem) for problem in problems]
    rows = [index for index in range(len(problems)) for _ in range(n)]
    end_ids = eos_token_ids(tokenizer)
    texts, lengths, finished, verdicts = [], [], [], []
    with ThreadPoolExecutor(max_workers=1) as verification, tqdm(
        total=len(problems), disable=not progress, desc=description, unit="problem"
    ) as bar:
        for start in range(0, len(rows), batch_size):
            batch_rows = rows[start : start + batch_size]
            encoded = tokenizer(
                [prompts[i] for i in batch_rows],
                return_tensors="pt",
                padding=True,
                padding_side="left",
                add_special_tokens=not template.chat,
            )
            generation = generate(
                encoded["input_ids"].to(device), encoded["attention_mask"].bool().to(device), sampling, generator
            )
            ids, mask = generation.response_ids.cpu(), generation.response_mask.cpu()
            batch_texts = tokenizer.batch_decode(
                [row[keep].tolist() for row, keep in zip(ids, mask)], skip_special_tokens=True
            )
            texts += batch_texts
            lengths += mask.sum(dim=1).tolist()
            finished += ended(ids, mask, end_ids).tolist()
            references = [problems[i].answer for i in batch_rows]
            verdicts.append(verification.submit(verifier.verify_batch, batch_texts, references))
            bar.update((start + len(batch_rows)) // n - bar.n)
        correct = [verdict for future in verdicts for verdict in future.result()]
    return [
        _problem_result(problems[index], ks, texts, lengths, finished, correct, slice(index * n, (index + 1) * n))
        for index in range(len(problems))
    ]


def _problem_result(problem, ks, texts, lengths, finished, correct, rows: slice) -> ProblemResult:
    verdicts = correct[rows]
    return ProblemResult(
        id=problem.id,
        reference=problem.answer,
        correct=verdicts,
        pass_at_k={k: pass_at_k(len(verdicts), sum(verdicts), k) for k in ks},
        response_lengths=lengths[rows],
        truncated=sum(not f for f in finished[rows]),
        responses=texts[rows],
        extracted=[extract_answer(text) for text in texts[rows]],
        fallback_answers=sum(answer_from_fallback(text) for text in texts[rows]),
    )


class PassAtKMetric(Metric):
    """Benchmark scores from per-problem results, reduced across ranks by summing.

    States (all summed over ranks): pass_at_k_sum [len(ks)] Σ_problems pass@k; problems; correct
    (correct samples); samples; response_tokens; truncated; fallback_answers. compute() →
        pass@k = pass_at_k_sum / problems, avg@n = correct / samples (every problem has n samples),
        response_length = response_tokens / samples, truncated = truncated / samples,
        fallback_answers = the count of answers taken from the last number, for want of a box.
    """

    full_state_update = False

    def __init__(self, ks: Sequence[int], n: int):
        super().__init__()
        self.ks, self.n = tuple(ks), n
        self.add_state("pass_at_k_sum", torch.zeros(len(self.ks), dtype=torch.float64), dist_reduce_fx="sum")
        for name in ("problems", "correct", "samples", "response_tokens", "truncated", "fallback_answers"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, results: Sequence[ProblemResult]) -> None:
        for result in results:
            if result.n != self.n or set(result.pass_at_k) != set(self.ks):
                raise ValueError(
                    f"problem {result.id}: n={result.n}, ks={sorted(result.pass_at_k)}; "
                    f"this metric expects n={self.n}, ks={list(self.ks)}"
                )
            self.pass_at_k_sum += torch.tensor([result.pass_at_k[k] for k in self.ks], dtype=torch.float64, device=self.device)
            self.problems += 1
            self.correct += result.num_correct
            self.samples += result.n
            self.response_tokens += sum(result.response_lengths)
            self.truncated += result.truncated
            self.fallback_answers += result.fallback_answers

    def compute(self) -> dict[str, Tensor]:
        scores = {f"pass@{k}": self.pass_at_k_sum[i] / self.problems for i, k in enumerate(self.ks)}
        scores[f"avg@{self.n}"] = self.correct / self.samples
        scores["response_length"] = self.response_tokens / self.samples
        scores["truncated"] = self.truncated / self.samples
        scores["fallback_answers"] = self.fallback_answers
        return scores
