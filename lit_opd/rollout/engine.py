"""The rollout-engine interface and its reference backend, HF `generate`.

An engine turns a batch of left-padded prompts into sampled responses. Every backend returns
the same `Generation`, so the training modules and the evaluation never know which one ran;
`lit_opd.rollout.factory.build_engine` makes one by name (this module knows no other backend).
"""

from abc import ABC, abstractmethod
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from transformers import GenerationConfig

EngineName = Literal["static", "hf", "vllm"]


@dataclass(frozen=True)
class SamplingConfig:
    """How responses are sampled. temperature 0 is greedy decoding; top_k 0 and top_p 1 are off."""

    max_new_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be ≥ 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be ≥ 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be ≥ 0, got {self.top_k}")


@dataclass
class Generation:
    """Sampled responses for B prompts.

    response_ids: [B, T] long, `pad_token_id` after each row's end; T = the longest response.
    response_mask: [B, T] bool, True on generated tokens up to and including the row's EOS.
    logp: [B, T] float32 log π(y_t) under the untempered model, 0 off the mask (None when the
        backend does not compute it; the training modules recompute it anyway).
    sample_logp: [B, T] float32 log-prob under the sampling distribution (temperature, top-p,
        top-k applied), or None.
    """

    response_ids: Tensor
    response_mask: Tensor
    logp: Tensor | None = None
    sample_logp: Tensor | None = None


def right_pad(sequences: list[list[int]], pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Token id lists → (ids [B, T] long, mask [B, T] bool), padded on the right; T ≥ 1."""
    width = max(1, max(map(len, sequences)))
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.bool)
    for row, tokens in enumerate(sequences):
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[row, : len(tokens)] = True
    return ids, mask


def response_mask_from_ids(response_ids: Tensor, eos_token_ids: list[int]) -> Tensor:
    """[B, T] bool: True up to and including the first EOS of each row (all True if none)."""
    is_eos = torch.isin(response_ids, torch.tensor(eos_token_ids, device=response_ids.device))
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return eos_before == 0


def ended(response_ids: Tensor, response_mask: Tensor, eos_token_ids: list[int]) -> Tensor:
    """[B] bool: whether each response ended with an EOS id (was not cut at max_new_tokens)."""
    is_eos = torch.isin(response_ids, torch.tensor(eos_token_ids, device=response_ids.device))
    return (is_eos & response_mask).any(dim=1)


class RolloutEngine(ABC):
    """Generates responses with the live weights of `model` (a HF causal LM). `paged`: the engine
    schedules rows within its own KV-cache memory, so callers need not cap the rows per call."""

    paged: bool = False

    @abstractmethod
    def generate(
        self,
        model: nn.Module,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        sampling: SamplingConfig,
        eos_token_ids: list[int],
        pad_token_id: int,
        generator: torch.Generator,
    ) -> Generation:
        """prompt_ids, prompt_mask: [B, P], left-padded. Sampling randomness comes from
        `generator` only, so a seeded generator gives the same responses."""

    def held_awake(self):
        """A context for several generate calls of one rollout batch (its parts): an engine that
        sleeps between rollout batches wakes once and sleeps after the last (none by default)."""
        return nullcontext()

    def close(self) -> None:
        """Release what the engine holds (none by default)."""


class HFGenerateEngine(RolloutEngine):
    """Reference backend: `transformers` `generate` with a dynamic KV cache.

    HF sampling draws from the global RNG, so it runs inside `torch.random.fork_rng`, seeded
    from `generator`: the global RNG of the caller is left untouched.
    """

    def generate(self, model, prompt_ids, prompt_mask, sampling, eos_token_ids, pad_token_id, generator):
        config = GenerationConfig(
            do_sample=sampling.temperature > 0,
            temperature=sampling.temperature if sampling.temperature > 0 else None,
            top_p=sampling.top_p if sampling.temperature > 0 else None,
            top_k=sampling.top_k if sampling.temperature > 0 else None,
            max_new_tokens=sampling.max_new_tokens,
            eos_token_id=list(eos_token_ids),
            pad_token_id=pad_token_id,
        )
        seed = int(torch.randint(0, 2**62, (), generator=generator))
        devices = [prompt_ids.device] if prompt_ids.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            sequences = model.generate(
                input_ids=prompt_ids, attention_mask=prompt_mask.long(), generation_config=config
            )
        response_ids = sequences[:, prompt_ids.shape[1] :]
        response_mask = response_mask_from_ids(response_ids, eos_token_ids)
        response_ids = response_ids.masked_fill(~response_mask, pad_token_id)
        return Generation(response_ids=response_ids, response_mask=response_mask)

