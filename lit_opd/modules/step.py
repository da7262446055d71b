"""The optimisation step's parts that are not the loss itself: what a step takes as given
(`StepPlan`) and what each micro-batch returns (`MicroResult`), the loss denominators of an
optimiser step, the guard against non-finite values and the scalars a step logs. Every function
that reduces across ranks is a collective: every rank calls it, in the same order."""

from dataclasses import dataclass, field

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.distributed.tensor import DTensor

from lit_opd.losses import Reduction, gated_reduce, truncated_importance_weight
from lit_opd.rollout.micro_batches import scatter_rows


@dataclass
class StepPlan:
    """What an optimiser step takes as given before its forwards (`DistillationModule.plan_step`).

    minibatch: the step's rows on the device, with the behaviour log-probs `old_logp` [N, T] unless
        the step's own forwards give them (a rollout batch's first step: π_old = π_θ).
    gates: the step-wide gates [N, T] each (None: each micro-batch's forward gives its own).
    bad: the names of the non-finite values met while planning.
    """

    minibatch: dict[str, Tensor]
    gates: list[Tensor] | None
    bad: list[str]


@dataclass
class MicroResult:
    """What one micro-batch's forward and backward computed, detached: its rows of the mini-batch
    (None: an empty micro-batch), log π_θ [n, T'], the position losses and the composed gate
    [n, T'] (None where none were computed) and the names of the non-finite values met."""

    rows: Tensor | None
    logp: Tensor
    position_loss: Tensor | None = None
    gate: Tensor | None = None
    bad: list[str] = field(default_factory=list)


def gather_results(results: list[MicroResult], like: Tensor, bad: list[str]) -> tuple[Tensor, Tensor, Tensor, list[str]]:
    """The step's [N, T] log-probs, position losses and composed gate (0, 0 and 1 where no
    micro-batch computed them), shaped like `like`, and the names of the non-finite values met:
    `bad`, then each micro-batch's in order."""
    logp, position_loss, gate, bad = torch.zeros_like(like), torch.zeros_like(like), torch.ones_like(like), list(bad)
    for result in results:
        scatter_rows(logp, result.rows, result.logp)
        if result.position_loss is not None:
            scatter_rows(position_loss, result.rows, result.position_loss)
            scatter_rows(gate, result.rows, result.gate)
        bad += result.bad
    return logp, position_loss, gate, bad


def all_reduce_sum(tensor: Tensor, device: torch.device) -> Tensor:
    """Σ over ranks (on `device` for the collective; returned on CPU); `tensor` alone without a
    process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        tensor = tensor.to(device)
        torch.distributed.all_reduce(tensor)
    return tensor.cpu()


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def step_normalizers(masks: list[Tensor], reduction: Reduction, world_size: int, device: torch.device) -> list[float]:
    """Per mini-batch (response masks [N_i, T_i]; one mini-batch is one optimiser step): the global
    count (tokens or sequences) of its step on all ranks divided by the world size, so that the
    ranks' gradient averaging gives Σ g m ℓ / (global count) exactly, however the step is cut."""
    if reduction == "token_mean":
        counts = torch.stack([m.sum() for m in masks]).double()
    else:
        counts = torch.stack([(m.sum(dim=1) > 0).sum() for m in masks]).double()
    return (all_reduce_sum(counts, device) / world_size).tolist()


def response_logprobs(mb: dict[str, Tensor], scores: dict[str, Tensor]) -> dict[str, Tensor]:
    """The log-probs (and GKD's teacher hidden states) a step uses, at response positions, under
    the names a warning gives them."""
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


def gradient_norms(parameters) -> Tensor:
    """[P] float32: the norm of each parameter's gradient (of this rank's shard under FSDP2)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    norms = [torch.linalg.vector_norm(g.to_local() if isinstance(g, DTensor) else g, dtype=torch.float32) for g in grads]
    return torch.stack(norms) if norms else torch.zeros(0)


class NonfiniteGuard:
    """Skips optimiser steps that meet a NaN or ±inf, and stops the run after `max_in_a_row`
    skipped steps with no optimiser step between.

    A skipped step still runs its backward on every rank (the collectives of DDP/FSDP) and
    counts as a step (global step, LR schedule, data position); its gradients are discarded in
    `before_optimizer_step`, so neither the weights nor the optimiser's moments move.
    """

    def __init__(self, max_in_a_row: int):
        self.max_in_a_row = max_in_a_row
        self.in_a_row, self.skipped, self.discard = 0, 0, False

    @staticmethod
    def nonfinite(named: dict[str, Tensor], device: torch.device) -> list[str]:
        """The names whose tensor holds a NaN or ±inf on some rank (a collective)."""
        flags = torch.stack([(~torch.isfinite(t.detach())).any().cpu() for t in named.values()]).double()
        return [name for name, flag in zip(named, all_reduce_sum(flags, device).tolist()) if flag]

    def skip(self, reason: str, step: int) -> None:
        """Count a skipped step, warn, and raise once `max_in_a_row` steps in a row were skipped."""
        self.in_a_row += 1
        self.skipped += 1
        self.discard = True
        rank_zero_warn(f"step {step}: {reason}; skipping this step ({self.in_a_row} in a row, "
                       f"limit {self.max_in_a_row})")
        if self.in_a_row >= self.max_in_a_row:
            raise RuntimeError(
                f"{self.in_a_row} steps in a row skipped for non-finite values, the last: {reason} "
                f"(model.max_nonfinite_steps={self.max_in_a_row}): stopping the run"
            )

    def before_optimizer_step(self, optimizer, gradient_norms: Tensor | None, step: int, device) -> bool:
        """Discard the gradients of a skipped step or of non-finite `gradient_norms` (all ranks
        agree; None: not checked, e.g. under fp16's GradScaler, which skips such steps itself).
        Returns whether the gradients stand (False: discarded)."""
        if not self.discard and gradient_norms is not None:
            if self.nonfinite({"gradients": gradient_norms}, device):
                self.skip(f"non-finite gradients at optimiser step {step}", step)
        if self.discard:
            optimizer.zero_grad(set_to_none=True)
            self.discard = False
            return False
        self.in_a_row = 0
        return True

    def state_dict(self) -> dict[str, int]:
        return {"nonfinite_skipped": self.skipped, "nonfinite_in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped, self.in_a_row = state["nonfinite_skipped"], state["nonfinite_in_a_row"]


def compose(gates: list[Tensor], like: Tensor) -> Tensor:
    """Π gates ([B, T] each; ones like `like` for none)."""
    gate = torch.ones_like(like)
    for g in gates:
        gate = gate * g
    return gate


def step_logs(
    mb: dict[str, Tensor], logp: Tensor, gates: list[Tensor], position_loss: Tensor, reduction: Reduction,
    reuse_index: int, importance_cap: float | None,
) -> tuple[dict[str, Tensor], Tensor]:
    """(scalars of this mini-batch — local means, teacher rows apart; on a rollout batch's weights
    (reuse 0) the rollout engine's too (`rollout_logs`) — , the composed gate at its valid positions)."""
    mask = mb["response_mask"]
    logp = logp.detach()
    gate = compose(gates, logp)
    valid = gate[mask]
    scalars = {
        "train/loss": gated_reduce(position_loss.detach(), gates, mask, reduction),
        "train/drift_abs_mean": masked_mean((logp - mb["old_logp"]).abs(), mask),
        "train/reverse_kl": masked_mean(logp - mb["teacher_logp"], mask),
        "train/gate_mean": valid.mean(),
        "train/gate_min": valid.min(),
        "train/gate_max": valid.max(),
        "train/reuse_index": float(reuse_index),
        **teacher_row_logs(mb, gate, position_loss),
        **(rollout_logs(mb, importance_cap) if reuse_index == 0 else {}),
    }
    return scalars, valid


def teacher_row_logs(mb: dict[str, Tensor], gate: Tensor, position_loss: Tensor) -> dict[str, Tensor]:
    """Scalars of the teacher rollouts mixed into this mini-batch (`from_teacher` [N]; gate: the
    composed gate [N, T]): their fraction of the rows, their mean advantage A = log π_T − log π_old,
    and their share of Σ |g ℓ| over the mini-batch's response tokens. {} when `from_teacher` is absent."""
    rows = mb.get("from_teacher")
    if rows is None:
        return {}
    logs = {"train/teacher_rows/fraction": rows.float().mean()}
    if rows.any():
        mask = mb["response_mask"]
        teacher_tokens = mask & rows[:, None]
        advantage = (mb["teacher_logp"] - mb["old_logp"]).detach()
        weighted = (gate * position_loss.detach()).abs() * mask
        logs["train/teacher_rows/advantage_mean"] = masked_mean(advantage, teacher_tokens)
        logs["train/teacher_rows/loss_share"] = weighted[rows].sum() / weighted.sum().clamp(min=1e-30)
    return logs


def importance_weight(mb: dict[str, Tensor], cap: float | None) -> Tensor | float:
    """The truncated importance weight min(π_old/π_rollout, C) of each sampled token
    (`losses.truncated_importance_weight`; C = rollout.vllm.importance_cap); 1 on teacher rows,
    and everywhere without a cap or without the rollout engine's log-probs (`rollout_logp`)."""
    if cap is None or "rollout_logp" not in mb:
        return 1.0
    weight = truncated_importance_weight(mb["old_logp"], mb["rollout_logp"], mb["response_mask"], cap)
    teacher_rows = mb.get("from_teacher")
    return weight if teacher_rows is None else torch.where(teacher_rows[:, None], 1.0, weight)


def rollout_logs(mb: dict[str, Tensor], cap: float | None) -> dict[str, Tensor]:
    """On student rows, the rollout engine's log π of the sampled tokens against the trainer's with
    the same weights (rollout/logp_mismatch: mean |log π_rollout − log π_old|) and, with a cap, the
    mean truncated importance weight. {} without the engine's log-probs."""
    if "rollout_logp" not in mb:
        return {}
    mask = mb["response_mask"]
    teacher_rows = mb.get("from_teacher")
    if teacher_rows is not None:
        mask = mask & ~teacher_rows[:, None]
    logs = {"rollout/logp_mismatch": masked_mean((mb["rollout_logp"] - mb["old_logp"]).abs(), mask)}
    if cap is not None:
        logs["rollout/importance_weight_mean"] = masked_mean(importance_weight(mb, cap), mask)
    return logs
