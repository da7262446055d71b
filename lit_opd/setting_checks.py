"""The valid ranges of the training modules' numeric settings, checked where they enter (the
settings dataclasses' `__post_init__`, a module's, gate's or callback's `__init__`), before any
model loads: a value out of range is a ValueError whose one line names the key, the range and the
value (`check_range`; `lit-opd` prints it as `lit-opd: error: ...`)."""

import math


def check_range(key: str, value, low=None, high=None, *, low_open: bool = False, high_open: bool = False,
                optional: bool = False) -> None:
    """Raise ValueError unless `low` ≤ `value` ≤ `high` (a strict bound with `low_open` /
    `high_open`; None: unbounded on that side). `optional`: None is allowed. NaN is never in range.

    >>> check_range("model.init_args.chunk_size", 0, 1)
    Traceback (most recent call last):
    ValueError: model.init_args.chunk_size must be ≥ 1, got 0
    """
    if value is None and optional:
        return
    in_range = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if in_range and low is not None:
        in_range = value > low if low_open else value >= low
    if in_range and high is not None:
        in_range = value < high if high_open else value <= high
    if not in_range:
        raise ValueError(f"{key} must be {describe(low, high, low_open, high_open)}"
                         f"{' or null' if optional else ''}, got {value!r}")


def describe(low, high, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '≥'} {low}"
    if high is not None:
        return f"{'<' if high_open else '≤'} {high}"
    return "a number"

MODEL = "model.init_args"


def check_rollout_settings(rollout) -> None:
    """`RolloutConfig` (model.init_args.rollout.*), with its vLLM settings."""
    key = f"{MODEL}.rollout"
    check_range(f"{key}.num_samples", rollout.num_samples, 1)
    check_range(f"{key}.max_new_tokens", rollout.max_new_tokens, 1)
    check_range(f"{key}.temperature", rollout.temperature, 0)
    check_range(f"{key}.top_p", rollout.top_p, 0, 1, low_open=True)
    check_range(f"{key}.top_k", rollout.top_k, 0)
    check_range(f"{key}.generate_batch_size", rollout.generate_batch_size, 0)
    check_range(f"{key}.score_batch_size", rollout.score_batch_size, 1)
    check_range(f"{key}.verify_timeout", rollout.verify_timeout, 0, low_open=True)
    check_range(f"{key}.vllm.kv_cache_memory_bytes", rollout.vllm.kv_cache_memory_bytes, 1, optional=True)
    check_range(f"{key}.vllm.max_model_len", rollout.vllm.max_model_len, 1, optional=True)
    # teacher_phases: checked by PhasedTeacherSampling, built in setup (before configure_model loads models)


def check_optim_settings(optim) -> None:
    """`OptimConfig` (model.init_args.optim.*)."""
    check_adamw(f"{MODEL}.optim", optim.lr, optim.weight_decay, optim.betas, optim.warmup_steps)
    check_range(f"{MODEL}.optim.gradient_clip_val", optim.gradient_clip_val, 0, low_open=True, optional=True)


def check_adamw(key: str, lr: float, weight_decay: float, betas, warmup_steps: int) -> None:
    """AdamW's settings and its warm-up, under `key` (model.init_args.optim, or model.init_args)."""
    check_range(f"{key}.lr", lr, 0)
    check_range(f"{key}.weight_decay", weight_decay, 0)
    if len(betas) != 2:
        raise ValueError(f"{key}.betas must be two numbers, got {list(betas)}")
    for i, beta in enumerate(betas):
        check_range(f"{key}.betas[{i}]", beta, 0, 1, high_open=True)
    check_range(f"{key}.warmup_steps", warmup_steps, 0)


def check_sft_settings(lr: float, weight_decay: float, betas, warmup_steps: int, chunk_size: int) -> None:
    """`SFTModule`'s optimiser and chunk size (model.init_args.*)."""
    check_adamw(MODEL, lr, weight_decay, betas, warmup_steps)
    check_range(f"{MODEL}.chunk_size", chunk_size, 1)


def check_step_settings(chunk_size: int, micro_batch_tokens: int, max_nonfinite_steps: int) -> None:
    """The shared module arguments the optimiser step depends on."""
    check_range(f"{MODEL}.chunk_size", chunk_size, 1)
    check_range(f"{MODEL}.micro_batch_tokens", micro_batch_tokens, 0)
    check_range(f"{MODEL}.max_nonfinite_steps", max_nonfinite_steps, 1)
