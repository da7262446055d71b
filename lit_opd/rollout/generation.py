"""Generating with a model of the trainer (the student, or the teacher in the trainer) through a
rollout engine: eval mode, at most a given number of rows a call, the model gathered if sharded."""

from collections.abc import Callable

import torch
from torch import Tensor, nn

from lit_opd.rollout.engine import Generation, RolloutEngine, SamplingConfig
from lit_opd.rollout.teacher_sampling import pad_columns
from lit_opd.sharding import gathered


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


def generate_rows(
    engine: RolloutEngine, scorer: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, sampling: SamplingConfig,
    eos_token_ids: list[int], pad_token_id: int, generator: torch.Generator, batch_size: int = 0,
    on_part: Callable[[int, Generation], None] | None = None,
) -> Generation:
    """Sample responses with `scorer`'s model (a `CausalLMScorer`) in eval mode, at most
    `batch_size` rows per engine call (0: all; its KV cache grows with them). A paged engine (vLLM)
    takes every row and the weights one tensor at a time, unless `on_part` asks for the parts; the
    others run the model itself, gathered if sharded. `on_part(first row, part)` is handed each
    engine call's Generation as soon as it is done (to score it while the rest generate).
    [B, P] → Generation."""
    model = scorer.model
    was_training = model.training
    model.eval()
    size = prompt_ids.shape[0] if engine.paged and on_part is None else batch_size or prompt_ids.shape[0]
    parts = []
    try:
        with torch.no_grad(), engine.held_awake() if engine.paged else gathered(scorer):
            for i in range(0, prompt_ids.shape[0], size):
                parts.append(engine.generate(model, prompt_ids[i : i + size], prompt_mask[i : i + size], sampling,
                                             eos_token_ids, pad_token_id, generator))
                if on_part is not None:
                    on_part(i, parts[-1])
    finally:
        model.train(was_training)
    return parts[0] if len(parts) == 1 else concat_generations(parts, pad_token_id)
