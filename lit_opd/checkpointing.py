"""Checkpoints that survive a kill, and resuming from them exactly.

- `AtomicCheckpointIO` writes a checkpoint to a temporary file beside it, fsyncs it and renames it
  over the target (`os.replace`): a reader, and `--ckpt_path last`, sees the previous checkpoint
  or the new one, never part of one. `lit-opd` uses it unless the trainer is given its own.
- `find_last_checkpoint`: what `--ckpt_path last` means to a user, the newest `last.ckpt` of
  earlier runs under the same logger name (Lightning looks only in the new run's own, empty,
  version directory).
- `resume_layout` / `check_resume_layout`: the settings a checkpoint's rollout buffer and data
  position depend on; resuming with other values is refused.
- `save_last_checkpoint`: `last.ckpt` written by the run itself before it stops on an error.
- `gather_rank_states`: per-rank state (each rank's rollout buffer and sampling generator) brought
  to rank 0, which alone writes the checkpoint.
"""

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_opd.lora import lora_layout

PARTIAL_SUFFIX = ".partial"


def atomic_save(obj: Any, path: Path) -> None:
    """`torch.save(obj, path)`, all or nothing: the bytes go to `.<name>.<pid>.partial` in the same
    directory, are flushed and fsynced, and `os.replace` puts the file in place (atomic on POSIX
    and Windows); the directory is fsynced so the rename survives a power loss. Partial files of
    `path` left by killed writers are removed after a successful write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}{PARTIAL_SUFFIX}")
    try:
        with open(partial, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    if hasattr(os, "O_DIRECTORY"):
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    for stale in path.parent.glob(f".{path.name}.*{PARTIAL_SUFFIX}"):
        stale.unlink(missing_ok=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's TorchCheckpointIO with atomic local writes (`atomic_save`). A process killed
    while saving leaves the previous checkpoint whole. Remote paths (`s3://...`) are written by
    Lightning's own code. A file that cannot be read as a checkpoint is a ValueError naming it."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_save(checkpoint, Path(path))

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only: bool | None = None):
        try:
            return super().load_checkpoint(path, map_location, weights_only)
        except (RuntimeError, EOFError, pickle.UnpicklingError) as error:
            raise ValueError(f"{path}: not a readable checkpoint ({one_line(error)})") from error


def use_atomic_checkpoint_io(trainer) -> None:
    """Give the trainer's strategy an AtomicCheckpointIO, unless it was configured with its own."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()


def read_checkpoint(path) -> dict[str, Any]:
    """A checkpoint's contents with its tensors memory-mapped, not read: cheap checks before a run
    commits to loading it. For a sharded (directory) checkpoint, its metadata file."""
    path = Path(path)
    if path.is_dir():
        path = path / _METADATA_FILENAME
    if path.is_file() and not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a checkpoint (a torch.save archive is a zip file; this is not)")
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as error:
        raise ValueError(f"{path}: not a readable checkpoint ({one_line(error)})") from error


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


# ------------------------------------------------------------------------- ckpt_path="last"
def save_last_checkpoint(trainer) -> str:
    """Write `last.ckpt` beside the run's other checkpoints (its ModelCheckpoint's directory, else
    <default_root_dir>/checkpoints), where `--ckpt_path last` finds it; a collective. Called in a
    training step before it changed anything, it is the last finished step's: resuming re-runs the
    step. Returns its path."""
    callback = trainer.checkpoint_callback
    directory = callback.dirpath if callback is not None and callback.dirpath else os.path.join(
        trainer.default_root_dir, "checkpoints")
    path = os.path.join(directory, "last.ckpt")
    trainer.save_checkpoint(path)
    return path


def find_last_checkpoint(trainer, continue_run: bool) -> str | None:
    """The newest `last*.ckpt` that `ckpt_path="last"` means: in a ModelCheckpoint's `dirpath` if
    it has one; else, where checkpoints go under the logger (`<save_dir>/<name>/version_N/
    checkpoints`, Lightning's default) and the logger's version is not fixed, in any version
    directory of that name. With `continue_run`, the logger takes the version found, so the
    resumed run logs and checkpoints where it left off. None when there is none."""
    logger = trainer.loggers[0] if trainer.loggers else None
    # TensorBoardLogger and CSVLogger pick a new version lazily when `_version` is None.
    versioned = logger is not None and getattr(logger, "_version", 0) is None
    found: list[tuple[Path, int | None]] = []
    for callback in trainer.checkpoint_callbacks:
        if not isinstance(callback, ModelCheckpoint):
            continue
        pattern = f"{callback.CHECKPOINT_NAME_LAST}*{callback.FILE_EXTENSION}"
        if callback.dirpath is not None:
            found += [(p, None) for p in Path(callback.dirpath).glob(pattern)]
        elif versioned:
            root = Path(logger.save_dir or trainer.default_root_dir) / str(logger.name or "")
            for path in root.glob(f"version_*/checkpoints/{pattern}"):
                version = path.parent.parent.name.removeprefix("version_")
                if version.isdigit():
                    found.append((path, int(version)))
        else:
            found += [(Path(p), None) for p in callback._find_last_checkpoints(trainer)]
    found = [(p, v) for p, v in found if p.exists()]
    if not found:
        return None
    path, version = max(found, key=lambda item: item[0].stat().st_mtime)
    if continue_run and version is not None:
        logger._version = version
    return str(path)


# ------------------------------------------------------------------------------- layout
def resume_layout(module, datamodule, trainer) -> dict[str, Any]:
    """The settings a checkpoint's rollout buffer and data position depend on, by their CLI names:
    the variant, the teacher that scored the buffer, the rows and normalisers of the buffer
    (num_samples, teacher top-K, reduction, processes), the LoRA settings and base the weights
    depend on (`lora.lora_layout`) and the step → rollout mapping of the data schedule (prompts_per_rollout, reuse, num_minibatches)."""
    teacher = module.teacher_path
    layout = {
        "model.class_path": f"{type(module).__module__}.{type(module).__qualname__}",
        "model.init_args.teacher": os.path.realpath(teacher) if os.path.exists(teacher) else teacher,
        "model.init_args.rollout.num_samples": module.rollout.num_samples,
        "model.init_args.reduction": module.reduction,
        "model.init_args.top_k": module.teacher_top_k,
        "processes (trainer.num_nodes × trainer.devices)": trainer.num_nodes * trainer.num_devices,
        **lora_layout(module),
    }
    hparams = getattr(datamodule, "hparams", {})
    for name in ("prompts_per_rollout", "reuse", "num_minibatches"):
        if name in hparams:
            layout[f"data.{name}"] = hparams[name]
    return layout


def check_resume_layout(saved: dict[str, Any], current: dict[str, Any], source: str) -> None:
    """ValueError naming every setting of `saved` (a checkpoint's layout) that `current` changes."""
    changed = [
        f"{key} is {current[key]!r} here but {saved[key]!r} in the checkpoint"
        for key in saved
        if key in current and current[key] != saved[key]
    ]
    if changed:
        raise ValueError(
            f"cannot resume from {source}: {'; '.join(changed)}. Its rollout buffer and data position depend "
            f"on these settings: resume with the checkpoint's values, or start a new run from its weights"
        )


# ----------------------------------------------------------------------------- per rank
def gather_rank_states(state: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Every rank's `state` in rank order on rank 0, None on the others; `[state]` without a
    process group. A collective: every rank calls it (Lightning calls `on_save_checkpoint` on all)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [state]
    states = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(state, states, dst=0)
    return states
