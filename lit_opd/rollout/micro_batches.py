"""Token-budget micro-batches: an optimiser step's mini-batch cut into pieces whose padded token
count stays within a budget, so that the step's memory is set by the budget, not by the rows.

Rows are [left-padded prompt | right-padded response]; a micro-batch is trimmed to its own
longest prompt and response, so its padded token count is rows × (longest prompt + longest
response). No packing (that would need variable-length attention).
"""

import torch
from torch import Tensor

from lit_opd.rollout.buffer import trim_response

# Per-row tensors of a rollout mini-batch that are laid out [N, P+T] (the rest are [N, T, ...] or [N]).
PROMPT_AND_RESPONSE = ("input_ids", "attention_mask")


def prompt_response_lengths(mb: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """([N] prompt tokens, [N] response tokens) of each row: its unpadded lengths."""
    T = mb["response_ids"].shape[1]
    return mb["attention_mask"][:, :-T].sum(dim=1), mb["response_mask"].sum(dim=1)


def cut_rows(prompt_lengths: Tensor, response_lengths: Tensor, budget: int) -> list[Tensor]:
    """Row indices of each micro-batch. budget ≤ 0: one micro-batch of every row, in order. Else
    rows sorted by length (prompt + response), longest first, fill micro-batches greedily while
    rows × (longest prompt + longest response) ≤ budget (a row over the budget goes alone); the
    micro-batches come largest padded token count first, so an out-of-memory shows at once."""
    if budget <= 0:
        return [torch.arange(len(prompt_lengths))]
    order = torch.argsort(prompt_lengths + response_lengths, descending=True, stable=True).tolist()
    parts, current, longest_prompt, longest_response = [], [], 0, 0
    for row in order:
        p, r = int(prompt_lengths[row]), int(response_lengths[row])
        if current and (len(current) + 1) * (max(longest_prompt, p) + max(longest_response, r)) > budget:
            parts.append((len(current) * (longest_prompt + longest_response), current))
            current, longest_prompt, longest_response = [], 0, 0
        current.append(row)
        longest_prompt, longest_response = max(longest_prompt, p), max(longest_response, r)
    parts.append((len(current) * (longest_prompt + longest_response), current))
    parts.sort(key=lambda part: -part[0])
    return [torch.tensor(rows, dtype=torch.long) for _, rows in parts]


def take_rows(mb: dict[str, Tensor], rows: Tensor) -> dict[str, Tensor]:
    """The rows `rows` of a mini-batch, trimmed of the prompt columns that are padding in every one
    of them (on the left) and of the response columns none of them uses (on the right)."""
    T = mb["response_ids"].shape[1]
    part = {key: value[rows.to(value.device)] for key, value in mb.items()}
    used = part["attention_mask"][:, :-T].any(dim=0).nonzero()
    first = int(used.min()) if len(used) else mb["attention_mask"].shape[1] - T
    for key in PROMPT_AND_RESPONSE:
        part[key] = part[key][:, first:]
    return trim_response(part)


def step_micro_batches(mb: dict[str, Tensor], budget: int, device: torch.device) -> list[Tensor | None]:
    """`cut_rows` of a mini-batch, padded with None (an empty micro-batch) to the most micro-batches
    any rank has: every rank must run as many forwards and backwards (their collectives) as the others."""
    parts = cut_rows(*prompt_response_lengths(mb), budget)
    count = torch.tensor(len(parts), device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
    return parts + [None] * (int(count) - len(parts))


def take_micro_batch(mb: dict[str, Tensor], rows: Tensor | None) -> dict[str, Tensor]:
    """`take_rows(mb, rows)` (the mini-batch itself for all of its rows in order); for None (an
    empty micro-batch) the first row with no response token counting, so that the forward runs
    (and its collectives) but contributes nothing."""
    if rows is not None:
        whole = len(rows) == len(mb["response_ids"]) and bool((rows == torch.arange(len(rows))).all())
        return mb if whole else take_rows(mb, rows)
    empty = take_rows(mb, torch.zeros(1, dtype=torch.long))
    empty["response_mask"] = torch.zeros_like(empty["response_mask"])
    return empty


def scatter_rows(full: Tensor, rows: Tensor | None, part: Tensor) -> None:
    """full[rows, :T'] = part ([len(rows), T', ...]); nothing for an empty micro-batch."""
    if rows is not None:
        full[rows.to(full.device), : part.shape[1]] = part.to(full.dtype)
