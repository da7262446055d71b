"""Phased teacher sampling (SG-OPD's cold start): early on, part of each rollout batch's prompts
also get teacher rollouts, and those the verifier endorses replace student rollouts."""

import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor


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


class PhasedTeacherSampling(Callback):
    """A schedule of (start step, teacher fraction) phases, e.g. [[0, 0.5], [50, 0.25], [100, 0.0]].

    At a rollout batch opened at global step s, the phase with the largest start ≤ s gives the
    fraction f: ⌈f·P⌉ of the P prompts (drawn with the module's generator) also get
    `num_samples` teacher rollouts. Teacher rollouts the verifier endorses replace student
    rollouts of the same prompt — the student's wrong ones first — and are tagged
    `from_teacher`; a prompt with no endorsed teacher rollout keeps the student's. Their
    behavior log-probs are the student's, computed after mixing like every other row.
    The schedule is a function of the global step, so resuming mid-phase resumes that phase.
    """

    def __init__(self, schedule: list[tuple[int, float]]):
        if not schedule:
            raise ValueError("PhasedTeacherSampling.schedule must name at least one (start_step, fraction) phase")
        starts = [int(start) for start, _ in schedule]
        if starts != sorted(starts) or starts[0] != 0:
            raise ValueError(f"schedule starts must be increasing from 0, got {starts}")
        for start, fraction in schedule:
            if not 0.0 <= fraction <= 1.0:
                raise ValueError(f"schedule fraction at step {start} must be in [0, 1], got {fraction}")
        self.schedule = [(int(s), float(f)) for s, f in schedule]

    def fraction_at(self, step: int) -> float:
        return [f for start, f in self.schedule if start <= step][-1]

    def mix_rollouts(self, module, batch: dict, rows: dict[str, Tensor], answers: list[str]) -> dict[str, Tensor]:
        fraction = self.fraction_at(module.global_step)
        prompts = batch["prompt_ids"].shape[0]
        chosen = torch.randperm(prompts, generator=module.generator)[: int(-(-fraction * prompts // 1))]
        module.log("train/teacher_rollout_fraction", len(chosen) / prompts)
        if len(chosen) == 0:
            return rows
        n = module.rollout.num_samples
        chosen = chosen.sort().values.to(batch["prompt_ids"].device)
        prompt_ids = batch["prompt_ids"][chosen].repeat_interleave(n, dim=0)
        prompt_mask = batch["prompt_mask"][chosen].repeat_interleave(n, dim=0)
        generation = module.generate_teacher_responses(prompt_ids, prompt_mask)
        teacher_answers = [batch["answers"][i] for i in chosen.tolist() for _ in range(n)]
        endorsed = module.verify_responses(generation.response_ids, generation.response_mask, teacher_answers)
        module.log("train/teacher_endorsed_rate", endorsed.float().mean())
        targets, sources = self.pair_rows(chosen, endorsed.view(-1, n), rows.get("correct"), n)
        if not targets:
            return rows
        targets_t = torch.tensor(targets, device=rows["input_ids"].device)
        sources_t = torch.tensor(sources, device=rows["input_ids"].device)
        mixed = replace_responses(rows, targets_t, generation.response_ids[sources_t],
                                  generation.response_mask[sources_t], module.tokenizer.pad_token_id)
        mixed["from_teacher"] = rows["from_teacher"].clone()
        mixed["from_teacher"][targets_t] = True
        if "correct" in rows:
            mixed["correct"] = rows["correct"].clone()
            mixed["correct"][targets_t] = True
        module.log("train/teacher_mixed_fraction", len(targets) / rows["input_ids"].shape[0])
        return mixed

    @staticmethod
    def pair_rows(chosen: Tensor, endorsed: Tensor, correct: Tensor | None, n: int) -> tuple[list[int], list[int]]:
        """(student row, teacher row) pairs: for chosen prompt j (rows j·n .. j·n+n−1 of both the
        batch and, at position i, the teacher generation), each endorsed teacher rollout
        replaces one student rollout, the student's wrong ones first."""
        targets, sources = [], []
        for i, prompt in enumerate(chosen.tolist()):
            good = endorsed[i].nonzero().flatten().tolist()
            student_rows = list(range(prompt * n, prompt * n + n))
            if correct is not None:
                student_rows.sort(key=lambda r: bool(correct[r]))
            for student_row, teacher_sample in zip(student_rows, good):
                targets.append(student_row)
                sources.append(i * n + teacher_sample)
        return targets, sources
