"""Checkpoints that survive a kill, and resuming from them exactly.

- `AtomicCheckpointIO` writes a checkpoint to a temporary file beside it, fsyncs it and renames it
  over the target (`os.replace`): a reader, and `--ckpt_path last`, sees the previous checkpoint
  or the new one, never part of one. `lit-opd` uses it unless the trainer is given its own.
- `AtomicShardedSave`: the same for a sharded checkpoint (a directory, one shard per rank: FSDP2's
  ModelParallelStrategy, FSDP1's FSDPStrategy with sharded state dicts), which `os.replace` cannot
  swap: every rank writes into a staging directory, and after a barrier rank 0 renames the old
  checkpoint aside and the staged one in (`swap_in`; `recover_swap` finishes a swap a kill cut).
- `find_last_checkpoint`: what `--ckpt_path last` means to a user, the newest `last.ckpt` of
  earlier runs under the same logger name (Lightning looks only in the new run's own, empty,
  version directory).
- `resume_layout` / `check_resume_layout`: the settings a checkpoint's rollout buffer and data
  position depend on; resuming with other values is refused.
- `check_resume`: that, and a buffer that holds what the configured gates read.
- `save_last_checkpoint`: `last.ckpt` written by the run itself before it stops on an error;
  `ResumableCheckpoints` (a callback every distillation module brings): atomic writes whichever
  way the trainer was built, and `last.ckpt` at the end of a fit whose last step no checkpoint holds.
- `gather_rank_states`: per-rank state (each rank's rollout buffer and sampling generator) brought
  to rank 0, which alone writes the checkpoint.
"""

import os
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

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
    fsync_directory(path.parent)
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


def fsync_directory(directory: Path) -> None:
    """Make the renames in `directory` survive a power loss (where the OS allows it)."""
    if hasattr(os, "O_DIRECTORY"):
        handle = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


# ----------------------------------------------------------------- sharded checkpoints
SHARDS_METADATA = ".metadata"  # torch.distributed.checkpoint's, written after every rank's shards


def staging_path(path: Path) -> Path:
    """Where the sharded checkpoint `path` is written first: a hidden name that neither
    `--ckpt_path last` nor ModelCheckpoint's `last*.ckpt` ever match."""
    return path.with_name(f".{path.name}.staging")


def aside_path(path: Path) -> Path:
    """Where the checkpoint `path` is renamed while its successor is renamed in."""
    return path.with_name(f".{path.name}.aside")


def is_complete_sharded(path: Path) -> bool:
    """A sharded checkpoint directory every rank finished: the shards' index (written once all
    shards are) and Lightning's metadata (written after it)."""
    return (path / SHARDS_METADATA).is_file() and (path / _METADATA_FILENAME).is_file()


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def swap_in(staging: Path, path: Path, reached=lambda point: None) -> None:
    """Put the complete checkpoint `staging` at `path`: the old one (if any) is renamed aside, the
    staged one renamed in, then the old one removed. A kill between the two renames leaves no
    `path`: `recover_swap` then renames the staged one in. `reached(point)` is called after each
    step ("set_aside", "swapped"; a test kills the process there)."""
    aside = aside_path(path)
    if path.exists() or path.is_symlink():
        remove(aside)
        os.rename(path, aside)
        reached("set_aside")
    os.rename(staging, path)
    fsync_directory(path.parent)
    reached("swapped")
    remove(aside)


def recover_swap(path: Path) -> None:
    """Finish a swap (`swap_in`) that a kill cut between its two renames: with no `path` but a
    set-aside one, the staged checkpoint is complete (it is set aside only then) and is renamed
    in; were it not, the set-aside one would be renamed back. Safe to run on every rank at once."""
    aside, staging = aside_path(path), staging_path(path)
    if path.exists() or not aside.exists():
        return
    try:
        os.rename(staging if is_complete_sharded(staging) else aside, path)
    except FileNotFoundError:  # another process renamed it first
        pass


def recover_swaps(directory: Path) -> None:
    """`recover_swap` for every checkpoint of `directory` that has a set-aside one."""
    for aside in Path(directory).glob(".*.aside"):
        recover_swap(aside.with_name(aside.name[1 : -len(".aside")]))


class AtomicShardedSave:
    """A strategy mixin (listed after the strategy: `use_atomic_checkpoint_io` can then give a
    strategy object its subclass): a sharded checkpoint (a directory, each rank writing its shard)
    is complete or absent at its name. Every rank writes into `staging_path(path)`; after a barrier
    rank 0 swaps it in (`swap_in`), and the others wait for it. Other checkpoints are saved as the
    strategy does."""

    __slots__ = ()

    def writes_directory(self) -> bool:
        if isinstance(self, ModelParallelStrategy):
            return self._save_distributed_checkpoint
        return getattr(self, "_state_dict_type", None) == "sharded"

    def save_staged(self, save, checkpoint: dict[str, Any], filepath, storage_options: Any | None) -> None:
        """`save(checkpoint, filepath, storage_options)` (the strategy's own), staged and swapped in
        when it writes a directory."""
        if not self.writes_directory():
            return save(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        staging = staging_path(path)
        if self.is_global_zero:
            remove(staging)  # left by a save that was killed
            if path.exists():
                remove(aside_path(path))
        self.barrier("lit_opd_staging_clean")
        save(checkpoint, staging, storage_options)
        self.reached("shards_written")
        self.barrier("lit_opd_staging_written")
        if self.is_global_zero:
            self.reached("staged")
            swap_in(staging, path, self.reached)
        self.barrier("lit_opd_swapped")

    def reached(self, point: str) -> None:
        """Called at each point of a sharded save ("shards_written" on every rank; "staged",
        "set_aside", "swapped" on rank 0); does nothing (tests kill a process here)."""


class AtomicModelParallelStrategy(ModelParallelStrategy, AtomicShardedSave):
    """Lightning's ModelParallelStrategy (FSDP2) with sharded checkpoints swapped in whole."""

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        self.save_staged(super().save_checkpoint, checkpoint, filepath, storage_options)


class AtomicFSDPStrategy(FSDPStrategy, AtomicShardedSave):
    """Lightning's FSDPStrategy (FSDP1) with sharded checkpoints swapped in whole."""

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        self.save_staged(super().save_checkpoint, checkpoint, filepath, storage_options)


ATOMIC_STRATEGIES = {ModelParallelStrategy: AtomicModelParallelStrategy, FSDPStrategy: AtomicFSDPStrategy}


def use_atomic_checkpoint_io(trainer) -> None:
    """Make the trainer's checkpoints atomic: its strategy gets an AtomicCheckpointIO, unless it was
    configured with its own, and Lightning's ModelParallelStrategy or FSDPStrategy becomes its
    `AtomicShardedSave` subclass (the same object and state; only sharded saves change)."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    atomic = ATOMIC_STRATEGIES.get(type(trainer.strategy))
    if atomic is not None:
        trainer.strategy.__class__ = atomic


def read_checkpoint(path) -> dict[str, Any]:
    """A checkpoint's contents with its tensors memory-mapped, not read: cheap checks before a run
    commits to loading it. For a sharded (directory) checkpoint, its metadata file."""
    path = Path(path)
    if path.is_dir():
        if not is_complete_sharded(path):
            missing = [name for name in (SHARDS_METADATA, _METADATA_FILENAME) if not (path / name).is_file()]
            raise ValueError(f"{path}: a torn sharded checkpoint (no {' and no '.join(missing)}): a save was cut "
                             f"short; resume from another checkpoint")
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
    step. Returns what happened, for the message of the error that stops the run: the path written
    and how to resume, or that nothing was written (trainer.enable_checkpointing is false)."""
    callback = trainer.checkpoint_callback
    if callback is None:
        return ("nothing was written (trainer.enable_checkpointing is false): a rerun starts over; enable "
                "checkpointing to keep the finished steps")
    directory = callback.dirpath if callback.dirpath else os.path.join(trainer.default_root_dir, "checkpoints")
    path = os.path.join(directory, "last.ckpt")
    trainer.save_checkpoint(path)
    return f"wrote {path}: resume with --ckpt_path last"


class ResumableCheckpoints(Callback):
    """Every checkpoint is complete or absent, and whenever checkpointing is on the last step of a
    fit is saved: at setup the trainer gets atomic writes (`use_atomic_checkpoint_io`: `lit-opd`
    does it too, Python callers get it here); at the end of fit, a run whose ModelCheckpoint last
    saved an earlier step (max_steps not a multiple of every_n_train_steps) writes `last.ckpt`
    (`save_last_checkpoint`)."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        use_atomic_checkpoint_io(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        callback = trainer.checkpoint_callback
        if isinstance(callback, ModelCheckpoint) and callback._last_global_step_saved != trainer.global_step:
            save_last_checkpoint(trainer)


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
            recover_swaps(Path(callback.dirpath))
            found += [(p, None) for p in Path(callback.dirpath).glob(pattern)]
        elif versioned:
            root = Path(logger.save_dir or trainer.default_root_dir) / str(logger.name or "")
            for directory in root.glob("version_*/checkpoints"):
                recover_swaps(directory)
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
    the variant, the student's shape (its weights and optimiser state), the teacher that scored the
    buffer, the rows and normalisers of the buffer (num_samples, teacher top-K, reduction,
    processes) and the step → rollout
    mapping of the data schedule (prompts_per_rollout, reuse, num_minibatches)."""
    teacher = module.teacher_path
    layout = {
        "model.class_path": f"{type(module).__module__}.{type(module).__qualname__}",
        "model.init_args.teacher": os.path.realpath(teacher) if os.path.exists(teacher) else teacher,
        "model.init_args.rollout.num_samples": module.rollout.num_samples,
        "model.init_args.reduction": module.reduction,
        "model.init_args.top_k": module.teacher_top_k,
        "processes (trainer.num_nodes × trainer.devices)": trainer.num_nodes * trainer.num_devices,
    }
    shape = model_shape(module.student_path)
    if shape is not None:
        layout["model.init_args.student (hidden size, layers, vocabulary rows)"] = shape
    hparams = getattr(datamodule, "hparams", {})
    for name in ("prompts_per_rollout", "reuse", "num_minibatches"):
        if name in hparams:
            layout[f"data.{name}"] = hparams[name]
    return layout


def model_config(path: str):
    """The (text) config of the HF model at `path`, no weights read; None where it cannot be read here."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except Exception:
        return None
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def model_shape(path: str) -> tuple[int, int, int] | None:
    """(hidden size, layers, vocabulary rows) of the HF model at `path` (None: config unreadable)."""
    config = model_config(path)
    return None if config is None else (config.hidden_size, config.num_hidden_layers, config.vocab_size)


def checkpoint_dtype(path: str) -> torch.dtype | None:
    """The dtype the HF checkpoint at `path` was saved in (its config's; None: unknown)."""
    config = model_config(path)
    dtype = getattr(config, "dtype", None) if config is not None else None
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def check_resume(state: dict[str, Any], module, datamodule, trainer, source: str) -> None:
    """Refuse to resume from `state` (checkpoint["lit_opd"] of `source`) where this run would misread
    it: another layout (`check_resume_layout`), or a gate that reads verifier verdicts the
    checkpoint's rollout buffer was collected without (a sign gate added on resume)."""
    check_resume_layout(state["layout"], resume_layout(module, datamodule, trainer), source)
    needing = [type(gate).__name__ for gate in module.gates if gate.needs_verdicts]
    buffers = [rank["buffer"] for rank in state["ranks"] if rank.get("buffer") is not None]
    if needing and any("correct" not in mb for buffer in buffers for mb in buffer["minibatches"]):
        raise ValueError(
            f"cannot resume from {source}: model.init_args.gates has {', '.join(needing)}, which reads verifier "
            f"verdicts, but the checkpoint's rollout buffer was collected without them: resume with the "
            f"checkpoint's gates, or add the gate from a checkpoint at a rollout batch's end")


def check_resume_layout(saved: dict[str, Any], current: dict[str, Any], source: str) -> None:
    """ValueError naming every setting of `saved` (a checkpoint's layout) that `current` changes."""
    changed = [
        f"{key} is {current[key]!r} here but {saved[key]!r} in the checkpoint"
        for key in saved
        if key in current and current[key] != saved[key]
    ]
    if changed:
        raise ValueError(
            f"cannot resume from {source}: {'; '.join(changed)}. Its weights, rollout buffer and data position "
            f"depend on these settings: resume with the checkpoint's values, or start a new run from its weights"
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
