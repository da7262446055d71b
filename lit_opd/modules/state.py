"""What a distillation module adds to a Lightning checkpoint for an exact resume: the settings
its rollout buffer and data position depend on (refused if a resumed run changes them), every
rank's rollout buffer and sampling generator, and the non-finite step counters; the checkpoint
written before a run stops because collecting a rollout batch failed; and what a resumed run takes
from its own command instead (`CommandOptimiserSettings`)."""

from contextlib import contextmanager

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from lit_opd.checkpointing import check_resume, gather_rank_states, resume_layout, save_last_checkpoint
from lit_opd.modules.step import NonfiniteGuard
from lit_opd.rollout.buffer import RolloutBuffer
from lit_opd.rollout.collection import CollectionFailed, one_line
from lit_opd.rollout.teacher_engines import TeacherUnreachable


def check_opens_rollout(batch: dict, buffer: RolloutBuffer | None) -> None:
    """A data item that needs a new rollout batch must be its first (mini-batch 0 of reuse 0):
    otherwise a resumed run's data position and rollout buffer disagree."""
    if batch["minibatch_index"] or batch["reuse_index"]:
        held = None if buffer is None else buffer.rollout_index
        raise RuntimeError(
            f"the data opens rollout batch {batch['rollout_index']} at mini-batch {batch['minibatch_index']}, "
            f"reuse {batch['reuse_index']}, but the rollout buffer holds rollout batch {held}: the data "
            f"position and the buffer of a resumed run disagree"
        )


def drop_teacher_keys(module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict post-hook: the frozen teacher's parameters are not training state (checkpoints
    hold no teacher: it is reloaded from model.teacher)."""
    for key in [k for k in state_dict if k.startswith(prefix + "teacher.")]:
        del state_dict[key]


def training_state(module, buffer: RolloutBuffer | None, generator: torch.Generator, guard: NonfiniteGuard) -> dict:
    """checkpoint["lit_opd"] of `module` (a collective: every rank calls it)."""
    rank_state = {
        "buffer": buffer.state_dict() if buffer is not None else None,
        "generator": generator.get_state() if generator is not None else None,
    }
    return {
        "layout": resume_layout(module, module.trainer.datamodule, module.trainer),
        "ranks": gather_rank_states(rank_state),
        **guard.state_dict(),
    }


def restore_training_state(
    module, state: dict, source: str, guard: NonfiniteGuard
) -> tuple[RolloutBuffer | None, torch.Generator | None]:
    """Check `state` (checkpoint["lit_opd"] read from `source`) against this run's settings,
    restore `guard`, and return this rank's (rollout buffer, sampling generator)."""
    check_resume(state, module, module.trainer.datamodule, module.trainer, source)
    guard.load_state_dict(state)
    mine = state["ranks"][module.global_rank]
    buffer = RolloutBuffer.from_state_dict(mine["buffer"], torch.device("cpu")) if mine["buffer"] is not None else None
    generator = None
    if mine["generator"] is not None:
        generator = torch.Generator(device="cpu")
        generator.set_state(mine["generator"])
    rank_zero_info("restored the rollout buffer and sampling generator from the checkpoint")
    return buffer, generator


@contextmanager
def checkpoint_if_collection_fails(trainer, generator: torch.Generator):
    """Runs the body (a rollout collection) with a function that tells whether a flag is on on any
    rank (`collection.settle`, so that every rank learns of a failure before the collection's next
    collective). If the collection failed on any rank (an unreachable teacher, a refused or malformed
    answer, the engine, the verifier pool, ...), every rank puts `generator` back, a checkpoint of the
    last finished step is written, and every rank stops with one line naming the failure and the
    checkpoint (`TeacherUnreachable` where that was the failure, else `CollectionFailed`). A
    collective: every rank enters and leaves together."""
    generator_state, failure = generator.get_state(), None
    try:
        yield lambda flag: trainer.strategy.reduce_boolean_decision(flag, all=False)
    except Exception as error:
        failure = error
    if trainer.strategy.reduce_boolean_decision(failure is not None, all=False):
        generator.set_state(generator_state)
        saved = save_last_checkpoint(trainer)  # "wrote <path>: resume with ..." or "nothing was written ..."
        cause = failure.__cause__ if isinstance(failure, CollectionFailed) else failure
        if isinstance(cause, TeacherUnreachable):  # its message names the server and the tries
            raise TeacherUnreachable(f"{cause}; {saved}") from None
        reason = str(failure) if isinstance(failure, CollectionFailed) else one_line(failure)
        raise CollectionFailed(f"{reason}; {saved}") from None


def apply_optimiser_settings(optimizer: torch.optim.Optimizer, scheduler, optim) -> None:
    """Give `optimizer` and its LambdaLR `scheduler` the learning rate, weight decay and betas of
    `optim` (an `OptimConfig`), keeping their state (Adam's moments, the step count): each group's
    lr is optim.lr × the schedule's factor at the scheduler's step, computed as LambdaLR computes it,
    so settings equal to the restored ones change no bit."""
    scheduler.base_lrs = [optim.lr] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = optim.lr
        group["lr"] = optim.lr * factor(scheduler.last_epoch)
        group["weight_decay"] = optim.weight_decay
        group["betas"] = tuple(optim.betas)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


class CommandOptimiserSettings(Callback):
    """A resumed fit optimises with the command's `model.init_args.optim` (lr, weight_decay, betas,
    and warmup_steps, whose schedule is never saved), not the checkpoint's: Lightning restores the
    optimiser's and scheduler's state, learning rate included, and this callback then applies the
    command's settings to it (`apply_optimiser_settings`) before the first step."""

    def on_train_start(self, trainer, pl_module) -> None:
        for optimizer, config in zip(trainer.optimizers, trainer.lr_scheduler_configs):
            apply_optimiser_settings(optimizer, config.scheduler, pl_module.optim)
