"""Phased teacher sampling (SG-OPD's cold start), a part of rollout collection: early on, part of
each rollout batch's prompts also get teacher rollouts, and those the verifier endorses replace
student rollouts of the same prompt."""

from collections.abc import Callable

import torch
from torch import Tensor

from lit_opd.rollout.engine import Generation


def pad_columns(tensor: Tensor, width: int, value) -> Tensor:
    """Right-pad dimension 1 of `tensor` to `width`."""
    if tensor.shape[1] >= width:
        return tensor
    pad = tensor.new_full((tensor.shape[0], width - tensor.shape[1], *tensor.shape[2:]), value)
    return torch.cat([tensor, pad], dim=1)


def replace_responses(
    rows: dict[str, Tensor], targets: Tensor, response_ids: Tensor, response_mask: Tensor, pad_token_id: int
) -> dict[str, Tensor]:
    """Rows `targets` of `rows` take the given responses ([len(targets), T'] ids and mask); the
    prompt part is kept; the response width becomes max(T, T')."""
    width = max(rows["response_ids"].shape[1], response_ids.shape[1])
    out = dict(rows)
    out["response_ids"] = pad_columns(rows["response_ids"], width, pad_token_id).clone()
    out["response_mask"] = pad_columns(rows["response_mask"], width, False).clone()
    out["response_ids"][targets] = pad_columns(response_ids, width, pad_token_id)
    out["response_mask"][targets] = pad_columns(response_mask, width, False)
    prompt_len = rows["input_ids"].shape[1] - rows["response_ids"].shape[1]
    prompt_ids, prompt_mask = rows["input_ids"][:, :prompt_len], rows["attention_mask"][:, :prompt_len]
    out["input_ids"] = torch.cat([prompt_ids, out["response_ids"]], dim=1)
    out["attention_mask"] = torch.cat([prompt_mask, out["response_mask"]], dim=1)
    return out


def pair_rows(chosen: Tensor, endorsed: Tensor, correct: Tensor, n: int) -> tuple[list[int], list[int]]:
    """(student row, teacher row) pairs: for chosen prompt j (rows j·n .. j·n+n−1 of the batch;
    at position i of `chosen`, rows i·n .. i·n+n−1 of the teacher generation), each endorsed
    teacher rollout replaces one student rollout, the student's wrong ones first."""
    targets, sources = [], []
    for i, prompt in enumerate(chosen.tolist()):
        good = endorsed[i].nonzero().flatten().tolist()
        student_rows = sorted(range(prompt * n, prompt * n + n), key=lambda r: bool(correct[r]))
        for student_row, teacher_sample in zip(student_rows, good):
            targets.append(student_row)
            sources.append(i * n + teacher_sample)
    return targets, sources


class PhasedTeacherSampling:
    """A schedule of (start step, teacher fraction) phases, e.g. [[0, 0.5], [50, 0.25], [100, 0.0]].

    At a rollout batch opened at global step s, the phase with the largest start ≤ s gives the
    fraction f: ⌈f·P⌉ of the P prompts (drawn with the module's generator) also get
    `num_samples` teacher rollouts. Teacher rollouts the verifier endorses replace student
    rollouts of the same prompt — the student's wrong ones first — and are tagged
    `from_teacher` (and `correct`); a prompt with no endorsed teacher rollout keeps the
    student's. Their behaviour log-probs are the student's, computed after mixing like every
    other row. The schedule is a function of the global step, so resuming mid-phase resumes it.
    """

    def __init__(self, schedule: list[tuple[int, float]]):
        starts = [int(start) for start, _ in schedule]
        if not schedule or starts != sorted(starts) or starts[0] != 0:
            raise ValueError(f"model.rollout.teacher_phases: phase starts must be increasing from 0, got {starts}")
        for start, fraction in schedule:
            if not 0.0 <= fraction <= 1.0:
                raise ValueError(f"model.rollout.teacher_phases: the fraction at step {start} must be in [0, 1], "
                                 f"got {fraction}")
        self.schedule = [(int(s), float(f)) for s, f in schedule]

    def fraction_at(self, step: int) -> float:
        return [f for start, f in self.schedule if start <= step][-1]

    def mix(
        self,
        step: int,
        batch: dict,
        rows: dict[str, Tensor],
        num_samples: int,
        generator: torch.Generator,
        generate: Callable[[Tensor, Tensor], Generation],
        verify: Callable[[Tensor, Tensor, list[str]], Tensor],
        pad_token_id: int,
    ) -> tuple[dict[str, Tensor], dict[str, float]]:
        """(rows with endorsed teacher rollouts mixed in, statistics to log). `rows` hold
        `num_samples` rows per prompt of `batch` and their verdicts `correct`; `generate(ids,
        mask)` samples teacher rollouts, `verify(ids, mask, answers)` checks them."""
        prompts = batch["prompt_ids"].shape[0]
        chosen = torch.randperm(prompts, generator=generator)[: int(-(-self.fraction_at(step) * prompts // 1))]
        stats = {"train/teacher_rollout_fraction": len(chosen) / prompts}
        if len(chosen) == 0:
            return rows, stats
        n = num_samples
        chosen = chosen.sort().values.to(batch["prompt_ids"].device)
        generation = generate(batch["prompt_ids"][chosen].repeat_interleave(n, dim=0),
                              batch["prompt_mask"][chosen].repeat_interleave(n, dim=0))
        answers = [batch["answers"][i] for i in chosen.tolist() for _ in range(n)]
        endorsed = verify(generation.response_ids, generation.response_mask, answers)
        stats["train/teacher_endorsed_rate"] = endorsed.float().mean().item()
        targets, sources = pair_rows(chosen, endorsed.view(-1, n), rows["correct"], n)
        if not targets:
            return rows, stats
        device = rows["input_ids"].device
        targets_t, sources_t = torch.tensor(targets, device=device), torch.tensor(sources, device=device)
        mixed = replace_responses(rows, targets_t, generation.response_ids[sources_t],
                                  generation.response_mask[sources_t], pad_token_id)
        for key in ("from_teacher", "correct"):
            mixed[key] = rows[key].clone()
            mixed[key][targets_t] = True
        stats["train/teacher_mixed_fraction"] = len(targets) / rows["input_ids"].shape[0]
        return mixed, stats
