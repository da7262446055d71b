"""The valid ranges of the distillation modules' numeric settings, checked where they enter (the
settings dataclasses' `__post_init__`, the module's `__init__`), before any model loads; each
error names the YAML key (`lit_opd.ranges.check_range`)."""

from lit_opd.ranges import check_range

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
    key = f"{MODEL}.optim"
    check_range(f"{key}.lr", optim.lr, 0)
    check_range(f"{key}.weight_decay", optim.weight_decay, 0)
    if len(optim.betas) != 2:
        raise ValueError(f"{key}.betas must be two numbers, got {list(optim.betas)}")
    for i, beta in enumerate(optim.betas):
        check_range(f"{key}.betas[{i}]", beta, 0, 1, high_open=True)
    check_range(f"{key}.warmup_steps", optim.warmup_steps, 0)
    check_range(f"{key}.gradient_clip_val", optim.gradient_clip_val, 0, low_open=True, optional=True)


def check_step_settings(chunk_size: int, micro_batch_tokens: int, max_nonfinite_steps: int) -> None:
    """The shared module arguments the optimiser step depends on."""
    check_range(f"{MODEL}.chunk_size", chunk_size, 1)
    check_range(f"{MODEL}.micro_batch_tokens", micro_batch_tokens, 0)
    check_range(f"{MODEL}.max_nonfinite_steps", max_nonfinite_steps, 1)
