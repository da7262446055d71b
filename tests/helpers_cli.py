"""`lit-opd fit` arguments shared by the end-to-end tests (tests/ is on sys.path under pytest)."""


def tiny_args(checkpoints, prompts_file, *extra):
    """Overrides that point a paper config at the tiny checkpoints and a local prompts file, with
    2 samples of at most 8 tokens per prompt, in float32."""
    return [
        f"--model.init_args.student={checkpoints['student']}",
        f"--model.init_args.teacher={checkpoints['teacher']}",
        "--model.init_args.dtype=float32",
        "--model.init_args.rollout.num_samples=2",
        "--model.init_args.rollout.max_new_tokens=8",
        "--model.init_args.rollout.score_batch_size=4",
        f"--data.tokenizer={checkpoints['student']}",
        f"--data.train_data={prompts_file}",
        *extra,
    ]
