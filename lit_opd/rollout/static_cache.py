"""The static-KV-cache rollout engine: the rollout state, the prefill / decode loop and CUDA-graph capture.

For HF causal LMs of the Llama family (Llama, Qwen2, Qwen3) the engine runs its own forward
pass, reading the weights straight from the HF modules on every call (no copy, so optimiser
steps are seen at once): a prefill of the left-padded prompts fills a pre-allocated KV cache,
then one decode step per token appends to it. Sampling (temperature → top-k → top-p, the order
of HF `generate`) draws with the exponential race argmax_v q_v / E_v, E_v ~ Exp(1), from the
caller's generator, so no step reads a value back to the host; whether every row has stopped is
checked every token on CPU and every `done_check_interval` tokens on CUDA. On CUDA the decode step
can be captured in CUDA graphs (`cuda_graphs=True`) and replayed per token. Architectures, RoPE
types or attention patterns it does not implement go to HF `generate`, with one logged warning.

The model-side forward pass, the KV cache and the sampling live in `lit_opd.rollout.decoder`.
"""

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_opd.rollout.decoder import Decoder, KVCache, sample_tokens, unsupported_reason
from lit_opd.rollout.engine import Generation, HFGenerateEngine, RolloutEngine, SamplingConfig

log = logging.getLogger(__name__)


class _Rollout:
    """The device state of one batch of rollouts: the KV cache, the next input, the per-row stop flags,
    the step counter s and the output buffers [B, N]. A decode step reads and writes only these tensors,
    so a CUDA graph can replay it; the prefill resets them, so one _Rollout serves call after call."""

    def __init__(self, decoder: Decoder, batch: int, prompt_len: int, sampling: SamplingConfig,
                 eos_token_ids: list[int], pad_token_id: int, device: torch.device):
        self.decoder, self.sampling, self.pad_token_id = decoder, sampling, pad_token_id
        self.prompt_len, self.max_new = prompt_len, sampling.max_new_tokens
        # The last sampled token is never fed back, so the cache needs P + N − 1 columns.
        self.cache = KVCache(decoder, batch, prompt_len + self.max_new - 1, device)
        self.eos = torch.tensor(eos_token_ids, dtype=torch.long, device=device)
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.step = torch.zeros(1, dtype=torch.long, device=device)
        vocab = decoder.lm_head[0].shape[0]
        self.uniform = None if sampling.temperature == 0 else torch.empty(batch, vocab, device=device)
        self.out_ids = torch.full((batch, self.max_new), pad_token_id, dtype=torch.long, device=device)
        self.out_mask = torch.zeros(batch, self.max_new, dtype=torch.bool, device=device)
        self.out_logp = torch.zeros(batch, self.max_new, device=device)
        self.out_sample_logp = torch.zeros(batch, self.max_new, device=device)

    @property
    def length(self) -> int:
        """Columns of the KV cache."""
        return self.cache.keys.shape[3]

    def prefill(self, prompt_ids: Tensor, prompt_mask: Tensor, generator: torch.Generator) -> None:
        """Run the [B, P] prompts through the model, filling cache columns 0..P−1, and sample response
        token 0. Positions are cumsum(mask) − 1, as HF `generate` gives them to left-padded rows."""
        P, device = self.prompt_len, prompt_ids.device
        self.cache.valid.zero_()
        self.cache.valid[:, :P] = prompt_mask
        positions = (prompt_mask.long().cumsum(dim=1) - 1).clamp(min=0)
        causal = torch.ones(P, P, dtype=torch.bool, device=device).tril()
        # A padding query also sees itself, so that no softmax row is empty (its output is never read).
        attend = (causal & prompt_mask[:, None, None, :]) | torch.eye(P, dtype=torch.bool, device=device)
        slots = torch.arange(P, device=device)
        logits = self.decoder.forward(prompt_ids, positions, self.cache, slots, P, attend)
        self.positions.copy_(positions[:, -1:])
        self.done.zero_()
        self.step.zero_()
        self.draw(generator)
        self.sample(logits)

    def draw(self, generator: torch.Generator) -> None:
        """Fresh uniform draws for the next sampled token (outside any CUDA graph: the generator is the
        caller's)."""
        if self.uniform is not None:
            self.uniform.uniform_(generator=generator)

    def decode(self, kv_len: int) -> None:
        """Step s ≥ 1: feed the last sampled token (cache column P+s−1) and sample response token s.
        kv_len: how many cache columns attention reads (≥ P+s; more are masked)."""
        self.step += 1
        self.positions += 1
        slot = self.step + (self.prompt_len - 1)
        self.cache.valid.index_fill_(1, slot, True)
        attend = self.cache.valid[:, None, None, :kv_len]
        logits = self.decoder.forward(self.tokens, self.positions, self.cache, slot, kv_len, attend)
        self.sample(logits)

    def sample(self, logits: Tensor) -> None:
        """Sample response token s for every row; finished rows get padding, log-probs 0 and a False mask."""
        tokens, logp, sample_logp = sample_tokens(logits, self.sampling, self.uniform)
        tokens = tokens.masked_fill(self.done, self.pad_token_id)
        self.out_ids.index_copy_(1, self.step, tokens[:, None])
        self.out_mask.index_copy_(1, self.step, ~self.done[:, None])
        self.out_logp.index_copy_(1, self.step, logp.masked_fill(self.done, 0)[:, None])
        self.out_sample_logp.index_copy_(1, self.step, sample_logp.masked_fill(self.done, 0)[:, None])
        self.done |= (tokens[:, None] == self.eos).any(dim=1)
        self.tokens.copy_(tokens[:, None])

    def finished(self, steps: int, check_interval: int) -> bool:
        """After `steps` sampled tokens: all N are sampled, or every row has stopped (looked at every
        check_interval steps only, as looking waits for the device)."""
        return steps >= self.max_new or (steps % check_interval == 0 and bool(self.done.all()))

    def result(self, steps: int) -> Generation:
        """The first `steps` columns, trimmed to the longest response."""
        mask = self.out_mask[:, :steps]
        length = int(mask.sum(dim=1).max())
        return Generation(
            response_ids=self.out_ids[:, :length].clone(), response_mask=mask[:, :length].clone(),
            logp=self.out_logp[:, :length].clone(), sample_logp=self.out_sample_logp[:, :length].clone(),
        )


@dataclass
class _Graphs:
    """Captured decode steps for one rollout shape: graphs[i] attends over the first kv_lens[i] columns."""

    key: tuple
    rollout: _Rollout
    kv_lens: list[int]
    graphs: list[torch.cuda.CUDAGraph]


class StaticCacheEngine(RolloutEngine):
    """The static-KV-cache engine for Llama / Qwen2 / Qwen3 HF causal LMs: static KV cache, own decode step,
    batched sampling with no host sync per token; other models go to HF `generate` (logged once per reason).

    cuda_graphs: on CUDA, capture the decode step in CUDA graphs and replay them, one per token (ignored
        on CPU). Attention in a graph reads a fixed number of cache columns, so one graph is captured per
        `graph_kv_bucket` columns of cache and each step replays the shortest that covers it. The graphs
        are kept for the next call with the same batch size, padded prompt length, sampling config, EOS
        ids, autocast state and weight addresses (in-place optimiser steps keep the addresses); prompts
        are left-padded to a multiple of `prompt_bucket` so that new prompt lengths rarely force a capture.
    done_check_interval: on CUDA, tokens between checks whether every row has stopped (each check waits
        for the device); on CPU the check is every token, where it costs nothing.
    """

    def __init__(
        self, cuda_graphs: bool = False, done_check_interval: int = 16, prompt_bucket: int = 64,
        graph_kv_bucket: int = 256,
    ):
        counts = dict(
            done_check_interval=done_check_interval, prompt_bucket=prompt_bucket, graph_kv_bucket=graph_kv_bucket
        )
        for name, value in counts.items():
            if value < 1:
                raise ValueError(f"{name} must be ≥ 1, got {value}")
        self.cuda_graphs = cuda_graphs
        self.done_check_interval = done_check_interval
        self.prompt_bucket = prompt_bucket
        self.graph_kv_bucket = graph_kv_bucket
        self.fallback = HFGenerateEngine()
        self._warned: set[str] = set()
        self._graphs: _Graphs | None = None

    def generate(self, model, prompt_ids, prompt_mask, sampling, eos_token_ids, pad_token_id, generator):
        reason = unsupported_reason(model)
        if reason is not None:
            if reason not in self._warned:
                self._warned.add(reason)
                log.warning("StaticCacheEngine falls back to HF generate: %s", reason)
            args = (prompt_ids, prompt_mask, sampling, eos_token_ids, pad_token_id, generator)
            return self.fallback.generate(model, *args)
        if prompt_mask.dtype != torch.bool or prompt_mask.shape != prompt_ids.shape:
            raise ValueError(
                f"prompt_mask must be a bool tensor shaped like prompt_ids {tuple(prompt_ids.shape)}, "
                f"got {prompt_mask.dtype} {tuple(prompt_mask.shape)}"
            )
        if not bool(prompt_mask[:, -1].all()):
            raise ValueError("prompts must be left-padded: the last column of prompt_mask must be all True")
        generator = _on_device(generator, prompt_ids.device)
        decoder = Decoder(model)
        args = (decoder, prompt_ids, prompt_mask, sampling, list(eos_token_ids), pad_token_id, generator)
        with torch.no_grad():
            if self.cuda_graphs and prompt_ids.device.type == "cuda" and sampling.max_new_tokens > 1:
                return self._generate_graphed(*args)
            return self._generate_eager(*args)

    def _generate_eager(self, decoder, prompt_ids, prompt_mask, sampling, eos_token_ids, pad_token_id, generator):
        B, P = prompt_ids.shape
        rollout = _Rollout(decoder, B, P, sampling, eos_token_ids, pad_token_id, prompt_ids.device)
        rollout.prefill(prompt_ids, prompt_mask, generator)
        interval = 1 if prompt_ids.device.type == "cpu" else self.done_check_interval
        steps = 1
        while not rollout.finished(steps, interval):
            rollout.draw(generator)
            rollout.decode(kv_len=P + steps)
            steps += 1
        return rollout.result(steps)

    def _generate_graphed(self, decoder, prompt_ids, prompt_mask, sampling, eos_token_ids, pad_token_id, generator):
        pad_columns = -prompt_ids.shape[1] % self.prompt_bucket
        prompt_ids = F.pad(prompt_ids, (pad_columns, 0), value=pad_token_id)
        prompt_mask = F.pad(prompt_mask, (pad_columns, 0), value=False)
        B, P = prompt_ids.shape
        device = prompt_ids.device
        key = (
            B, P, sampling, tuple(eos_token_ids), pad_token_id, device,
            torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type),
            tuple(t.data_ptr() for t in decoder.weights()),
        )
        if self._graphs is None or self._graphs.key != key:
            self._graphs = None  # frees the old graphs' memory before capturing new ones
            rollout = _Rollout(decoder, B, P, sampling, eos_token_ids, pad_token_id, device)
            kv_lens = list(range(P + self.graph_kv_bucket, rollout.length, self.graph_kv_bucket)) + [rollout.length]
            self._graphs = _Graphs(key, rollout, kv_lens, _capture_decode_steps(rollout, kv_lens))
        rollout, kv_lens, graphs = self._graphs.rollout, self._graphs.kv_lens, self._graphs.graphs
        rollout.prefill(prompt_ids, prompt_mask, generator)
        steps, bucket = 1, 0
        while not rollout.finished(steps, self.done_check_interval):
            while kv_lens[bucket] < P + steps:
                bucket += 1
            rollout.draw(generator)
            graphs[bucket].replay()
            steps += 1
        return rollout.result(steps)


def _capture_decode_steps(rollout: _Rollout, kv_lens: list[int]) -> list[torch.cuda.CUDAGraph]:
    """One CUDA graph of `rollout.decode(kv_len)` per kv_len, sharing one memory pool (they never run
    at once and pass no tensor to each other). Each is warmed up on a side stream first, as
    torch.cuda.graphs asks; the warm-ups leave junk in the state, which the next prefill resets. They
    sample from fixed noise, not the caller's generator, so that a capture does not change which
    rollouts a seed gives. Autocast's weight-cast cache is off while capturing: a cast made before the
    capture would be replayed from stale memory instead of being re-done from the live weights."""
    device = rollout.cache.keys.device
    dtype, enabled = torch.get_autocast_dtype(device.type), torch.is_autocast_enabled(device.type)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=enabled, cache_enabled=False)
    if rollout.uniform is not None:
        rollout.uniform.fill_(0.5)
    graphs, pool = [], None
    with autocast:
        for kv_len in kv_lens:
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                rollout.step.zero_()
                rollout.decode(kv_len)
            torch.cuda.current_stream(device).wait_stream(stream)
            rollout.step.zero_()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                rollout.decode(kv_len)
            pool = graph.pool()
            graphs.append(graph)
    return graphs


def _on_device(generator: torch.Generator, device: torch.device) -> torch.Generator:
    """`generator` if it draws on `device`, else a generator there seeded from it (still deterministic)."""
    if generator.device.type == device.type:
        return generator
    seeded = torch.Generator(device=device)
    seeded.manual_seed(int(torch.randint(0, 2**62, (), generator=generator)))
    return seeded
