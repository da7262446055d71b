"""Scoring rollouts in the trainer: no-grad log-probs of the response tokens (and the top-K) by a
`CausalLMScorer`, in forwards sized by a padded-token budget or by a row count."""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lit_opd.rollout.micro_batches import scatter_rows, step_micro_batches, take_micro_batch


@dataclass(frozen=True)
class ScoringSettings:
    """How a rollout batch is scored, set by the distillation module.

    top_k: the size of the teacher's support (0: none); exclude: token ids never in it.
    micro_batch_tokens: the padded tokens of one no-grad forward (`micro_batches.cut_rows`; 0:
        batch_size rows a forward); batch_size: rows per forward without that budget.
    """

    top_k: int = 0
    exclude: tuple[int, ...] = ()
    micro_batch_tokens: int = 0
    batch_size: int = 64


@torch.no_grad()
def score_rows(scorer: nn.Module, rows: dict[str, Tensor], settings: ScoringSettings, top_k: int = 0,
               exclude: tuple[int, ...] = ()) -> dict[str, Tensor]:
    """`scorer`'s no-grad scores of `rows`' responses ([N, T] "logp"; with top_k > 0 also
    [N, T, top_k] "topk_logp" and "topk_ids", never an id of `exclude`), in forwards sized by
    `settings` (micro_batch_tokens, else batch_size rows)."""
    exclude_ids = torch.tensor(sorted(exclude), dtype=torch.long) if top_k and len(exclude) else None
    if settings.micro_batch_tokens > 0:
        return score_micro_batches(scorer, rows, settings.micro_batch_tokens, top_k, exclude_ids)
    T = rows["response_ids"].shape[1]
    size = settings.batch_size
    parts = [
        scorer(rows["input_ids"][i : i + size], rows["attention_mask"][i : i + size], T, top_k=top_k,
               exclude=exclude_ids)
        for i in range(0, rows["input_ids"].shape[0], size)
    ]
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def score_micro_batches(scorer: nn.Module, rows: dict[str, Tensor], budget: int, top_k: int,
                        exclude: Tensor | None) -> dict[str, Tensor]:
    """`score_rows` in micro-batches of `budget` padded tokens (the same count on every rank)."""
    N, T = rows["response_ids"].shape
    out = {}
    for part in step_micro_batches(rows, budget, rows["response_ids"].device):
        micro = take_micro_batch(rows, part)
        scores = scorer(micro["input_ids"], micro["attention_mask"], micro["response_ids"].shape[1], top_k=top_k,
                        exclude=exclude)
        for key, value in scores.items():
            full = out.setdefault(key, value.new_zeros(N, T, *value.shape[2:]))
            scatter_rows(full, part, value)
    return out
