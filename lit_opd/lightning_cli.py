"""`lit-opd fit | validate | test`: LightningCLI over the distillation modules and the prompt
DataModule, and `fit_run`, the same for Python callers (the quickstart).

`lit-opd fit` loads configs/defaults.yaml (the papers' setup) before the files given with
`--config`; a `--config` value that is not a file names a shipped config (`opd_block64`,
`quickstart/base`), and so does a `--trainer.strategy` value under strategies/ (`strategies/fsdp2`).
"""

import os
import re
import sys
import warnings
from pathlib import Path

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from lit_opd.checkpointing import (
    check_resume,
    find_last_checkpoint,
    one_line,
    read_checkpoint,
    use_atomic_checkpoint_io,
)
from lit_opd.configs import config_file
from lit_opd.data.prompts import PromptDataModule
from lit_opd.rollout.collection import CollectionFailed
from lit_opd.rollout.teacher_engines import TeacherUnreachable

DEFAULTS = {"fit": {"default_config_files": [str(config_file("defaults"))]}}
# lit-opd passes `args` on purpose (sys.argv's with shipped config names resolved, or a quickstart
# stage's): LightningCLI's warning about `args` beside a non-empty sys.argv does not apply.
warnings.filterwarnings("ignore", message="LightningCLI's args parameter")


class OPDArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, whose errors are one line: `lit-opd: error: <key>: <reason>` and exit
    status 2, without the 80 lines of usage (`lit-opd <subcommand> --help` lists the options)."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:
            return super().error(message, ex)
        self._logger.error(message)
        sys.stderr.write(f"lit-opd: error: {condensed_parse_error(message)}\n")
        self.exit(2)


def condensed_parse_error(message: str) -> str:
    """jsonargparse's error `message` in one line. A value that fits no type of a union (an unknown
    or broken class_path, nested at any depth) becomes its key in CLI spelling
    (model.init_args.gates) and the innermost reason; any other message is joined into one line."""
    if "Does not validate against any of the Union subtypes" not in message:
        return " ".join(message.split())
    keys, class_path, reason = [], None, None
    for line in message.splitlines():
        text = line.strip()
        if match := re.match(r'Parser key "([^"]+)"', text):
            keys.append(match.group(1))
        elif match := re.match(r"- Problem with given class_path '([^']+)'", text):
            class_path = match.group(1)
            keys.append("init_args")
        elif text and not re.match(r"(Does not validate|Subtypes:|Errors:|Given value|- Expected a <class)", text):
            reason = reason or text
    while keys and keys[-1] == "init_args":
        keys.pop()
    where = ".".join(keys) or "a value"
    return f"{where}: class_path {class_path!r}: {reason}" if class_path else f"{where}: {reason}"


class OPDCLI(LightningCLI):
    """LightningCLI with the tokenizer set once (data.tokenizer → model.init_args.tokenizer) and
    checkpoints written atomically. `--ckpt_path` is resolved and checked before any model loads:
    `last` is the newest last.ckpt of earlier runs under the same logger name (a resumed fit logs
    and checkpoints on in that run's version directory, beside its config.yaml, which it leaves
    alone), a path must be a readable checkpoint, and a fit resumes only with the settings the
    checkpoint's rollout buffer and data position depend on."""

    def __init__(self, args: list[str] | None = None, run: bool = True):
        super().__init__(datamodule_class=PromptDataModule, subclass_mode_model=True, parser_kwargs=DEFAULTS,
                         parser_class=OPDArgumentParser,
                         save_config_kwargs={"overwrite": True}, args=args, run=run)

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.tokenizer", "model.init_args.tokenizer")

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path is not None and Path(path).is_file():
            read_checkpoint(path)  # LightningCLI reads it next, for its hyperparameters: fail here, clearly

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        use_atomic_checkpoint_io(trainer)
        return trainer

    def before_fit(self) -> None:
        check_manual_optimisation(self.trainer)
        check_teacher_retry_budget(self.model, self.trainer)
        self.resolve_checkpoint("fit")

    def before_validate(self) -> None:
        self.resolve_checkpoint("validate")

    def before_test(self) -> None:
        self.resolve_checkpoint("test")

    def resolve_checkpoint(self, subcommand: str) -> None:
        config = self.config_init[subcommand]
        path = config.get("ckpt_path")
        if path == "last":
            path = find_last_checkpoint(self.trainer, continue_run=subcommand == "fit")
            if path is None and subcommand != "fit":
                raise ValueError("--ckpt_path last: no earlier run of this config has a last.ckpt; give its path")
            if path is None:
                return  # Lightning warns and starts afresh: `last` may be set before a run's first start
            config["ckpt_path"] = path
        if path is None or path in ("best", "hpc") or str(path).startswith("registry") or "://" in str(path):
            return
        if not Path(path).exists():
            raise ValueError(f"--ckpt_path {path}: no such checkpoint file")
        checkpoint = read_checkpoint(path)
        if subcommand != "fit":
            return
        if "lit_opd" in checkpoint and hasattr(self.model, "teacher_path"):
            check_resume(checkpoint["lit_opd"], self.model, self.datamodule, self.trainer, path)
        for callback in self.trainer.callbacks:
            if isinstance(callback, SaveConfigCallback) and self.trainer.log_dir is not None:
                if os.path.exists(os.path.join(self.trainer.log_dir, callback.config_filename)):
                    callback.config_filename = f"config_resume_step{checkpoint['global_step']}.yaml"


def check_manual_optimisation(trainer) -> None:
    """lit_opd's modules optimise manually (an optimiser step is a mini-batch cut into micro-batches
    by a token budget), which Lightning's automatic clipping and accumulation do not drive."""
    if trainer.gradient_clip_val:
        raise ValueError("trainer.gradient_clip_val: lit_opd clips in its optimiser step; set "
                         "model.init_args.optim.gradient_clip_val instead")
    if trainer.accumulate_grad_batches != 1:
        raise ValueError("trainer.accumulate_grad_batches: an optimiser step is one mini-batch (data.num_minibatches "
                         "per epoch over a rollout batch); to bound its memory set model.init_args.micro_batch_tokens")


def check_teacher_retry_budget(module, trainer) -> None:
    """With several processes, a rank waiting on a teacher server must give up (and the run write
    its checkpoint on every rank) before the others, blocked in a collective, hit its timeout."""
    serving, timeout = getattr(module, "teacher_serving", None), getattr(trainer.strategy, "_timeout", None)
    if not getattr(module, "teacher_url", None) or timeout is None or trainer.num_nodes * trainer.num_devices == 1:
        return
    if serving.give_up_after_s() >= timeout.total_seconds():
        raise ValueError(
            f"model.init_args.teacher_serving: {serving.retries + 1} tries × timeout_s {serving.timeout_s:g} s + backoff "
            f"= {serving.give_up_after_s():g} s, beyond the strategy's collective timeout of "
            f"{timeout.total_seconds():g} s: lower retries or timeout_s, or raise trainer.strategy.init_args.timeout")


def resolve_config_names(args: list[str]) -> list[str]:
    """`args` with shipped config names resolved to their paths: every `--config`/`-c` value that is
    not a file, and a `--trainer.strategy` value under strategies/ (`strategies/fsdp2`)."""
    resolved, take_next = [], None
    for arg in args:
        option, equals, value = arg.partition("=")
        if take_next is not None:
            arg = str(config_file(arg)) if take_next in ("--config", "-c") or is_strategy_name(arg) else arg
            take_next = None
        elif arg in ("--config", "-c", "--trainer.strategy"):
            take_next = arg
        elif equals and (option in ("--config", "-c") or option == "--trainer.strategy" and is_strategy_name(value)):
            arg = f"{option}={config_file(value)}"
        resolved.append(arg)
    return resolved


def is_strategy_name(value: str) -> bool:
    return value.removeprefix("configs/").startswith("strategies/")


def run_lightning(args: list[str]) -> None:
    """`lit-opd <fit|validate|test> ...`: input errors lit_opd raises end the process with one line."""
    try:
        OPDCLI(args=resolve_config_names(args))
    except (TeacherUnreachable, CollectionFailed) as error:  # a checkpoint is written (or said not to be): one line
        sys.exit(f"lit-opd: error: {one_line(error)}")
    except ValueError as error:
        input_error = lit_opd_input_error(error)
        if input_error is None:
            raise
        sys.exit(f"lit-opd: error: {one_line(input_error)}")


def fit_run(configs: list[str], overrides: list[str] = ()) -> OPDCLI:
    """`lit-opd fit --config <each of configs> <overrides>` (names or paths); the finished CLI
    object holds the trainer and the module."""
    args = ["fit"] + [arg for config in configs for arg in ("--config", str(config_file(config)))] + list(overrides)
    return OPDCLI(args=args)


def lit_opd_input_error(error: BaseException) -> ValueError | None:
    """The ValueError that lit_opd's own code raised and `error` is or wraps (jsonargparse wraps
    errors raised while it instantiates the model), or None. lit_opd raises ValueError for bad
    input, with a message that names the field, file or line: one line says it all. Any other
    error keeps its traceback, and so do `lit_opd._checks`' checks of tensors inside the math,
    which fail on bugs, not on input."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        frame = error.__traceback__
        while frame is not None and frame.tb_next is not None:
            frame = frame.tb_next
        module = frame.tb_frame.f_globals.get("__name__", "") if frame is not None else ""
        if isinstance(error, ValueError) and module.split(".")[0] == "lit_opd" and module != "lit_opd._checks":
            return error
        error = error.__cause__ or error.__context__
    return None
