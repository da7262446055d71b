"""Token-budget micro-batches: every row once, within the budget, largest first, trimmed."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lit_opd.rollout.micro_batches import cut_rows, prompt_response_lengths, take_rows


def padded_tokens(mb: dict[str, torch.Tensor]) -> int:
    """The padded token count of a (micro-)batch: rows × columns of its input_ids."""
    return mb["input_ids"].numel()


def minibatch(prompts: list[int], responses: list[int], P: int = 6, T: int = 5) -> dict[str, torch.Tensor]:
    """Rows with the given prompt (left-padded to P) and response (right-padded to T) lengths."""
    N = len(prompts)
    prompt_mask = torch.tensor([[False] * (P - p) + [True] * p for p in prompts])
    response_mask = torch.tensor([[True] * r + [False] * (T - r) for r in responses])
    ids = torch.arange(N * (P + T)).view(N, P + T)
    return {
        "input_ids": ids, "attention_mask": torch.cat([prompt_mask, response_mask], dim=1),
        "response_ids": ids[:, P:], "response_mask": response_mask,
        "old_logp": torch.randn(N, T), "teacher_topk_ids": torch.zeros(N, T, 3, dtype=torch.long),
        "correct": torch.tensor([True] * N),
    }


def test_hand_cut():
    # lengths (prompt, response): (2,5)=7, (6,1)=7, (1,1)=2, (3,3)=6; budget 16.
    mb = minibatch([2, 6, 1, 3], [5, 1, 1, 3])
    parts = cut_rows(*prompt_response_lengths(mb), budget=16)
    # sorted: row 0 (7), row 1 (7), row 3 (6), row 2 (2). {0}: 1×7; {0,1}: 2×(6+5) = 22 > 16 → cut.
    # {1}: 7; {1,3}: 2×(6+3) = 18 > 16 → cut. {3}: 6; {3,2}: 2×(3+3) = 12 ≤ 16.
    assert [part.tolist() for part in parts] == [[3, 2], [0], [1]]  # by padded count: 12, 7, 7
    assert [part.tolist() for part in cut_rows(*prompt_response_lengths(mb), budget=0)] == [[0, 1, 2, 3]]


def test_take_rows_trims_to_its_own_longest_prompt_and_response():
    mb = minibatch([2, 6, 1, 3], [5, 1, 1, 3])
    part = take_rows(mb, torch.tensor([3, 2]))
    assert part["input_ids"].shape == (2, 3 + 3) and padded_tokens(part) == 12
    assert part["response_ids"].shape == (2, 3) and part["teacher_topk_ids"].shape == (2, 3, 3)
    assert part["attention_mask"].sum(dim=1).tolist() == [6, 2]
    torch.testing.assert_close(part["old_logp"], mb["old_logp"][[3, 2], :3])
    assert part["correct"].shape == (2,)
    assert torch.equal(part["input_ids"][0], mb["input_ids"][3, 3:9])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 6), st.integers(1, 5)), min_size=1, max_size=12), st.integers(1, 40))
def test_every_row_once_within_the_budget_largest_first(rows, budget):
    mb = minibatch([p for p, _ in rows], [r for _, r in rows])
    parts = cut_rows(*prompt_response_lengths(mb), budget)
    assert sorted(torch.cat(parts).tolist()) == list(range(len(rows)))
    counts = [padded_tokens(take_rows(mb, part)) for part in parts]
    assert all(count <= budget or len(part) == 1 for count, part in zip(counts, parts))
    assert counts == sorted(counts, reverse=True)
