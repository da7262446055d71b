"""The rollout buffer: one rollout batch, split into mini-batches, reused for several optimiser
steps. It is plain tensors, so it goes into checkpoints whole (exact resume mid-reuse)."""

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class RolloutBuffer:
    """rollout_index: which rollout batch of the schedule this is.
    minibatches: dicts of tensors with N_i rows each — input_ids / attention_mask [N_i, P+T],
        response_ids / response_mask / old_logp / teacher_logp [N_i, T] (mini-batch 0's old_logp
        from its first step on: that step's forward gives it), and per variant
        teacher_topk_logp / teacher_topk_ids [N_i, T, K], correct / from_teacher [N_i],
        rollout_logp [N_i, T] (the vllm engine's own log-probs, for rollout/logp_mismatch).
    normalizers: per mini-batch, the loss denominator (global token or sequence count of its
        optimiser step, divided by accumulation × world size).
    stats: scalars measured when the buffer was filled (timings, lengths), logged once.
    """

    rollout_index: int
    minibatches: list[dict[str, Tensor]]
    normalizers: list[float]
    stats: dict[str, float] = field(default_factory=dict)

    def state_dict(self) -> dict:
        return {
            "rollout_index": self.rollout_index,
            "minibatches": [{k: v.cpu() for k, v in mb.items()} for mb in self.minibatches],
            "normalizers": list(self.normalizers),
            "stats": dict(self.stats),
        }

    def keep_behaviour_logprobs(self, index: int, old_logp: Tensor) -> None:
        """Mini-batch `index`'s behaviour log-probs [N_i, T] from its first optimiser step on, whose
        forwards give them (the first mini-batch's are not scored at collection)."""
        kept = self.minibatches[index]
        if "old_logp" not in kept:
            kept["old_logp"] = old_logp.to(kept["teacher_logp"].device)

    @classmethod
    def from_state_dict(cls, state: dict, device: torch.device) -> "RolloutBuffer":
        minibatches = [{k: v.to(device) for k, v in mb.items()} for mb in state["minibatches"]]
        return cls(state["rollout_index"], minibatches, state["normalizers"], state["stats"])


def split_rows(batch: dict[str, Tensor], order: Tensor, parts: int) -> list[dict[str, Tensor]]:
    """Split the rows of a dict of [N, ...] tensors, in `order`, into `parts` mini-batches of
    near-equal size; each mini-batch is trimmed of response columns no row of it uses."""
    chunks = torch.tensor_split(order, parts)
    if any(len(c) == 0 for c in chunks):
        raise ValueError(f"cannot split {len(order)} rollouts into {parts} mini-batches")
    return [trim_response({k: v[c.to(v.device)] for k, v in batch.items()}) for c in chunks]


def trim_response(mb: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop trailing response columns that are padding in every row ([N, T] and [N, P+T] keys)."""
    mask = mb["response_mask"]
    T = mask.shape[1]
    used = int(mask.any(dim=0).nonzero().max()) + 1 if mask.any() else 1
    if used == T:
        return mb
    drop = T - used
    out = {}
    for key, value in mb.items():
        if key in ("input_ids", "attention_mask"):
            out[key] = value[:, : value.shape[1] - drop]
        elif value.dim() >= 2 and value.shape[1] == T:
            out[key] = value[:, :used]
        else:
            out[key] = value
    return out
