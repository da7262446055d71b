"""`lit-opd fit` arguments and checks shared by the end-to-end tests (tests/ is on sys.path under pytest)."""

import math
import socket
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM

from lit_opd.lightning_cli import fit_run

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = str(ROOT / "tests" / "data" / "tiny_overrides.yaml")
TRAIN_TAGS = {"train/loss", "train/gate_mean", "train/drift_abs_mean", "train/reverse_kl", "perf/generate_s"}


def tiny_args(checkpoints, prompts_file, *extra):
    """Overrides that point a paper config at the tiny checkpoints and a local prompts file, with
    2 samples of at most 8 tokens per prompt, in float32, on the static engine."""
    return [
        f"--model.init_args.student={checkpoints['student']}",
        f"--model.init_args.teacher={checkpoints['teacher']}",
        "--model.init_args.dtype=float32",
        "--model.init_args.teacher_dtype=float32",
        "--model.init_args.rollout.num_samples=2",
        "--model.init_args.rollout.max_new_tokens=8",
        "--model.init_args.rollout.engine=static",
        "--model.init_args.rollout.score_batch_size=4",
        f"--data.tokenizer={checkpoints['student']}",
        f"--data.train_data={prompts_file}",
        *extra,
    ]


def fit_and_check(config: str, checkpoints, prompts_file, log_dir: Path, *extra: str, tags=()) -> None:
    """`lit-opd fit --config <config> --config tests/data/tiny_overrides.yaml` on the tiny models with
    a TensorBoard logger in `log_dir`; asserts that the student's weights moved from its
    checkpoint, the last train/loss is finite and TRAIN_TAGS and `tags` were written."""
    cli = fit_run([config, OVERRIDES], [
        *tiny_args(checkpoints, prompts_file, *extra),
        "--trainer.logger=lightning.pytorch.loggers.TensorBoardLogger",
        f"--trainer.logger.init_args.save_dir={log_dir}", "--trainer.logger.init_args.name=run",
        "--trainer.logger.init_args.version=0", "--trainer.log_every_n_steps=1",
    ])
    before = AutoModelForCausalLM.from_pretrained(checkpoints["student"]).state_dict()
    after = cli.model.student.state_dict()
    assert any(not torch.equal(after[name], value) for name, value in before.items()), "the student did not move"
    assert math.isfinite(cli.trainer.callback_metrics["train/loss"].item())
    events = EventAccumulator(str(log_dir / "run" / "version_0"))
    events.Reload()
    missing = (TRAIN_TAGS | set(tags)) - set(events.Tags()["scalars"])
    assert not missing, f"TensorBoard tags not written: {sorted(missing)}"


def closed_port() -> int:
    """A local TCP port nothing listens on (a teacher server that refuses connections)."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        return closed.getsockname()[1]
