"""Sharding changes nothing but speed and memory: FSDP2 through Lightning's ModelParallelStrategy
(and FSDP1 through FSDPStrategy) on two CPU processes on gloo (`--trainer.devices 2`, Lightning
launches the second process), against one process on the same global batch (2 ranks × 2 prompts
= 1 × 4 prompts; greedy rollouts, so both sample the same responses).

Compared: the global loss of each step (the second step is a reuse step, where the Block64 drift
gate is active and normalised by its mean over the global batch), the full gradients, and the
weights after one AdamW step. Tolerances (float32 sums in another order): loss 1e-5 relative,
gradients 2e-5 relative (per tensor, in norm), weight updates 1e-4 relative (per tensor, in norm);
measured: ≤ 1e-6, ≤ 3e-6, ≤ 4e-6. Also: a sharded checkpoint resumes to the same losses as an
uninterrupted run, a sharded run exports a plain HF checkpoint, and rollouts under
`sharding.gathered` run no collective.
"""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sysconfig
from datetime import timedelta
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecisionPolicy
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers_cli import tiny_args
from lit_opd.checkpointing import AtomicModelParallelStrategy, aside_path, read_checkpoint, staging_path
from lit_opd.cli import main
from lit_opd.logprobs import CausalLMScorer
from lit_opd.rollout.engine import HFGenerateEngine, SamplingConfig
from lit_opd.rollout.static_cache import StaticCacheEngine
from lit_opd.sharding import full_tensors, gathered, shard_scorer

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = str(ROOT / "tests" / "data" / "tiny_overrides.yaml")
FSDP2_CPU = str(ROOT / "configs" / "strategies" / "fsdp2_cpu.yaml")
BLOCK_GATE = '[{"class_path": "lit_opd.gates.DriftGate", "init_args": {"unit": "block", "block_size": 4}}]'

pytestmark = pytest.mark.slow


class Probe(L.Callback):
    """Writes to `out` (rank 0) what the tests compare: losses.json (per step: the mean of the
    ranks' losses, which is the global loss since each rank divides by the global token count,
    and rank 0's gate spread), grads_<step>.pt (full gradients before the optimiser step) and
    weights_<step>.pt (full student weights after it) for the steps in `steps`; at the end of
    fit, with `export`, the student as a plain HF checkpoint in out/export."""

    def __init__(self, out: str, steps: list[int], export: bool = False):
        self.out, self.steps, self.export, self.rows = Path(out), steps, export, []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step + 1 in self.steps:
            fsdp1 = isinstance(pl_module.policy, FullyShardedDataParallel)
            with FullyShardedDataParallel.summon_full_params(pl_module.policy, writeback=False, with_grads=True) \
                    if fsdp1 else contextlib.nullcontext():
                grads = {name.replace("_fsdp_wrapped_module.", ""): full(p.grad)
                         for name, p in pl_module.student.named_parameters() if p.requires_grad}
            if trainer.is_global_zero:
                torch.save(grads, self.out / f"grads_{trainer.global_step + 1}.pt")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean")
        metrics = trainer.callback_metrics
        spread = (metrics["train/gate_max"] - metrics["train/gate_min"]).item()
        self.rows.append({"step": trainer.global_step, "loss": loss.item(), "gate_spread": spread})
        if trainer.global_step in self.steps:
            weights = get_model_state_dict(pl_module.policy, options=StateDictOptions(full_state_dict=True))
            if trainer.is_global_zero:
                weights = {name.removeprefix("model."): value for name, value in weights.items()}
                torch.save(weights, self.out / f"weights_{trainer.global_step}.pt")
        if trainer.is_global_zero:
            (self.out / "losses.json").write_text(json.dumps(self.rows))

    def on_train_end(self, trainer, pl_module):
        if self.export:
            pl_module.save_student_pretrained(str(self.out / "export"))


class FailTeacherGeneration(L.Callback):
    """On rank `rank`, phased teacher sampling's teacher generation fails at global step `step`,
    after the teacher generated (its collectives made: the failure is this rank's own)."""

    def __init__(self, step: int, rank: int = 1):
        self.step, self.rank = step, rank

    def on_train_start(self, trainer, pl_module):
        teacher = pl_module.collector.teacher
        generate = teacher.generate

        def failing(*args, **kwargs):
            generation = generate(*args, **kwargs)
            if trainer.global_rank == self.rank and trainer.global_step == self.step:
                raise RuntimeError(f"teacher generation failed on rank {self.rank}")
            return generation

        teacher.generate = failing


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy (FSDP1), unchanged: Lightning refuses the FSDPStrategy class itself
    on CPU, so the test names this subclass to run the same FSDP1 code on gloo."""


def full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


@pytest.fixture(scope="module")
def prompts_file(write_prompts):
    """Prompts of one length, so that left padding is the same in every batch layout."""
    return write_prompts(range(10, 34), lambda i: f"{i}+{i + 1}=?", lambda i: 2 * i + 1)


def fit_args(config, checkpoints, prompts_file, out, steps, prompts_per_rollout, max_steps, *extra, export=False,
             checkpoint_every_step=False, callbacks=()):
    callbacks = [{"class_path": "test_fsdp.Probe", "init_args": {"out": str(out), "steps": steps, "export": export}},
                 *callbacks]
    if checkpoint_every_step:
        callbacks.append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                          "init_args": {"dirpath": str(out / "ckpt"), "every_n_train_steps": 1, "save_top_k": -1}})
        extra = ("--trainer.enable_checkpointing=true", *extra)
    return [
        "fit", "--config", str(ROOT / "configs" / f"{config}.yaml"), "--config", OVERRIDES,
        *tiny_args(
            checkpoints, prompts_file,
            "--model.init_args.rollout.temperature=0",
            "--model.init_args.optim.lr=0.01",
            "--model.init_args.optim.warmup_steps=0",
            f"--data.prompts_per_rollout={prompts_per_rollout}",
            "--data.num_minibatches=1",
            "--data.reuse=2",
            f"--trainer.max_steps={max_steps}",
            f"--trainer.default_root_dir={out}",
            f"--trainer.callbacks={json.dumps(callbacks)}",
            *extra,
        ),
    ]


def lit_opd_script() -> str:
    """The `lit-opd` console script of this interpreter's environment."""
    script = Path(sysconfig.get_path("scripts")) / "lit-opd"
    found = str(script) if script.is_file() else shutil.which("lit-opd")
    assert found, "the lit-opd console script is not installed (pip install -e .)"
    return found


def fit_two_processes(args, out: Path, strategy: str, check: bool = True) -> subprocess.CompletedProcess:
    """`lit-opd fit` on 2 CPU processes; Lightning starts the second one (it reruns this command
    line, so the CLI runs as a script). `check`: assert that it exits 0."""
    command = [lit_opd_script(), *args, "--trainer.accelerator=cpu",
               "--trainer.devices=2", f"--trainer.strategy={strategy}"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(command, cwd=out, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def run(tmp_path_factory, name, config, checkpoints, prompts_file, devices, steps, max_steps, *extra, export=False,
        checkpoint_every_step=False, strategy=FSDP2_CPU):
    out = tmp_path_factory.mktemp(name)
    prompts = 4 // devices
    args = fit_args(config, checkpoints, prompts_file, out, steps, prompts, max_steps, *extra, export=export,
                    checkpoint_every_step=checkpoint_every_step)
    if devices == 1:
        main(args)
    else:
        fit_two_processes(args, out, strategy)
    return out


OPD = ("opd_block64", f"--model.init_args.gates={BLOCK_GATE}")


@pytest.fixture(scope="module")
def opd_one_process(tmp_path_factory, tiny_checkpoints, prompts_file):
    config, gates = OPD
    return run(tmp_path_factory, "opd_1", config, tiny_checkpoints, prompts_file, 1, [1, 2], 2, gates)


@pytest.fixture(scope="module")
def opd_sharded(tmp_path_factory, tiny_checkpoints, prompts_file):
    """Three steps, a sharded checkpoint after each, the student exported at the end."""
    config, gates = OPD
    return run(tmp_path_factory, "opd_2", config, tiny_checkpoints, prompts_file, 2, [1, 2, 3], 3, gates,
               export=True, checkpoint_every_step=True)


def losses(out: Path) -> list[float]:
    return [row["loss"] for row in json.loads((out / "losses.json").read_text())]


def assert_same_tensors(actual: dict, expected: dict, rtol: float, reference: dict | None = None) -> None:
    """Per tensor: ‖actual − expected‖ ≤ rtol · ‖expected − reference‖ (reference 0 if None)."""
    assert actual.keys() == expected.keys()
    for name in expected:
        scale = expected[name] - (reference[name] if reference is not None else 0)
        error = (actual[name] - expected[name]).norm().item()
        assert error <= rtol * scale.norm().item(), f"{name}: ‖Δ‖ = {error:.3g}, ‖ref‖ = {scale.norm().item():.3g}"


def initial_weights(checkpoints) -> dict:
    return AutoModelForCausalLM.from_pretrained(checkpoints["student"]).state_dict()


def test_opd_block64_sharded_equals_one_process(opd_one_process, opd_sharded, tiny_checkpoints):
    single, sharded = losses(opd_one_process), losses(opd_sharded)[:2]
    torch.testing.assert_close(sharded, single, rtol=1e-5, atol=0)
    rows = json.loads((opd_one_process / "losses.json").read_text())
    assert rows[1]["gate_spread"] > 0.05  # the reuse step is gated (drift > 0), so the global mean matters
    for step in (1, 2):
        grads = torch.load(opd_sharded / f"grads_{step}.pt"), torch.load(opd_one_process / f"grads_{step}.pt")
        assert_same_tensors(*grads, rtol=2e-5)
    weights = torch.load(opd_sharded / "weights_1.pt"), torch.load(opd_one_process / "weights_1.pt")
    assert_same_tensors(*weights, rtol=1e-4, reference=initial_weights(tiny_checkpoints))


def test_fsdp1_equals_one_process(opd_one_process, tmp_path_factory, tiny_checkpoints, prompts_file):
    """Lightning's FSDPStrategy: the scorer wrapped as the FSDP1 root, decoder layers as units."""
    config, gates = OPD
    strategy = json.dumps({"class_path": "test_fsdp.CPUFSDPStrategy",
                           "init_args": {"process_group_backend": "gloo", "state_dict_type": "sharded"}})
    sharded = run(tmp_path_factory, "opd_fsdp1", config, tiny_checkpoints, prompts_file, 2, [1], 2, gates,
                  strategy=strategy)
    torch.testing.assert_close(losses(sharded), losses(opd_one_process), rtol=1e-5, atol=0)
    assert_same_tensors(torch.load(sharded / "grads_1.pt"), torch.load(opd_one_process / "grads_1.pt"), rtol=2e-5)
    assert_same_tensors(torch.load(sharded / "weights_1.pt"), torch.load(opd_one_process / "weights_1.pt"),
                        rtol=1e-4, reference=initial_weights(tiny_checkpoints))


def test_topk_lsm_sharded_equals_one_process(tmp_path_factory, tiny_checkpoints, prompts_file):
    single = run(tmp_path_factory, "topk_1", "topk_lsm", tiny_checkpoints, prompts_file, 1, [1], 2)
    sharded = run(tmp_path_factory, "topk_2", "topk_lsm", tiny_checkpoints, prompts_file, 2, [1], 2)
    torch.testing.assert_close(losses(sharded), losses(single), rtol=1e-5, atol=0)
    assert_same_tensors(torch.load(sharded / "grads_1.pt"), torch.load(single / "grads_1.pt"), rtol=2e-5)
    assert_same_tensors(torch.load(sharded / "weights_1.pt"), torch.load(single / "weights_1.pt"), rtol=1e-4,
                        reference=initial_weights(tiny_checkpoints))


ALL_DRIFT_UNITS = [{"class_path": "lit_opd.gates.DriftGate", "init_args": {"unit": unit, "block_size": 4}}
                   for unit in ("token", "block", "span", "sequence")]
SIGN_GATE = {"class_path": "lit_opd.gates.SignConsistencyGate", "init_args": {"alpha": 0.5, "beta": 0.25}}
MICRO_BATCH_CASES = {  # variant config → its gates: every drift unit, composed (and the sign gate for SG-OPD)
    "opd_block64": ALL_DRIFT_UNITS, "topk_lsm_block64": ALL_DRIFT_UNITS, "sg_opd": [SIGN_GATE, *ALL_DRIFT_UNITS],
}


@pytest.mark.parametrize("config", sorted(MICRO_BATCH_CASES))
def test_micro_batches_equal_the_uncut_step(config, tmp_path_factory, tiny_checkpoints, prompts_file):
    """Loss, gradients and updated weights of a reuse step (drift ≠ 0, step 2) do not depend on how
    the step is cut: a budget of ~2 rows per micro-batch on one process and on 2 gloo processes
    (the gates normalised over the whole step, on all ranks) equals the uncut one-process step."""
    gates = f"--model.init_args.gates={json.dumps(MICRO_BATCH_CASES[config])}"
    budget = "--model.init_args.micro_batch_tokens=96"
    uncut = run(tmp_path_factory, f"{config}_uncut", config, tiny_checkpoints, prompts_file, 1, [2], 2, gates)
    rows = json.loads((uncut / "losses.json").read_text())
    assert rows[1]["gate_spread"] > 0.01  # the reuse step is gated
    for devices in (1, 2):
        cut = run(tmp_path_factory, f"{config}_cut{devices}", config, tiny_checkpoints, prompts_file, devices, [2], 2,
                  gates, budget)
        torch.testing.assert_close(losses(cut), losses(uncut), rtol=1e-5, atol=0)
        assert_same_tensors(torch.load(cut / "grads_2.pt"), torch.load(uncut / "grads_2.pt"), rtol=2e-5)
        # Adam divides by √v: where a gradient is at rounding level its two roundings can step
        # differently, so the weights after two steps agree less closely than the gradients.
        assert_same_tensors(torch.load(cut / "weights_2.pt"), torch.load(uncut / "weights_2.pt"), rtol=2e-3,
                            reference=initial_weights(tiny_checkpoints))


def test_sharded_checkpoint_resumes_to_the_same_losses(opd_sharded, tmp_path_factory, tiny_checkpoints, prompts_file):
    """Resume after step 1, in the middle of a rollout batch's reuse (each rank's rollout buffer,
    sampling generator, data position and optimiser shard come back), through the next rollout."""
    config, gates = OPD
    checkpoints = sorted((opd_sharded / "ckpt").iterdir())
    assert [c.name for c in checkpoints] == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt", "epoch=0-step=3.ckpt"]
    assert (checkpoints[0] / ".metadata").is_file()  # a sharded (distributed) checkpoint directory
    resumed = run(tmp_path_factory, "opd_resumed", config, tiny_checkpoints, prompts_file, 2, [], 3, gates,
                  f"--ckpt_path={checkpoints[0]}")
    torch.testing.assert_close(losses(resumed), losses(opd_sharded)[1:], rtol=1e-6, atol=0)


def test_a_collection_failure_on_one_rank_stops_both_after_a_checkpoint_that_resumes(tmp_path_factory,
                                                                                    tiny_checkpoints, prompts_file):
    """SG-OPD on 2 FSDP2 processes: at step 2 (it opens rollout batch 1) rank 1's phased teacher
    sampling fails after the teacher generated, while rank 0 goes on to verify and then to the
    student's sharded scoring forwards. Every rank learns of it first (`collection.settle`), so both
    stop with one line naming the failure and the checkpoint of step 2; resumed from it, the run
    gives the uninterrupted run's losses."""
    failing = {"class_path": "test_fsdp.FailTeacherGeneration", "init_args": {"step": 2, "rank": 1}}
    phases = "--model.init_args.rollout.teacher_phases=[[0, 1.0]]"
    straight = run(tmp_path_factory, "sg_straight", "sg_opd", tiny_checkpoints, prompts_file, 2, [], 4, phases)
    out = tmp_path_factory.mktemp("sg_failing")
    args = fit_args("sg_opd", tiny_checkpoints, prompts_file, out, [], 2, 4, phases,
                    "--trainer.enable_checkpointing=true", callbacks=[failing])
    result = fit_two_processes(args, out, FSDP2_CPU, check=False)
    last = out / "checkpoints" / "last.ckpt"
    message = (f"lit-opd: error: RuntimeError: teacher generation failed on rank 1; wrote {last}: resume with "
               f"--ckpt_path last\n")
    assert result.returncode != 0 and message in result.stderr, result.stderr[-6000:]
    assert f"lit-opd: error: collecting the rollout batch failed on another rank; wrote {last}" in result.stderr
    assert "Traceback" not in result.stderr
    assert (last / ".metadata").is_file() and len(losses(out)) == 2
    resumed = run(tmp_path_factory, "sg_resumed", "sg_opd", tiny_checkpoints, prompts_file, 2, [], 4, phases,
                  f"--ckpt_path={last}")
    torch.testing.assert_close(losses(resumed), losses(straight)[2:], rtol=1e-6, atol=0)


class DyingStrategy(AtomicModelParallelStrategy):
    """FSDP2 on gloo whose rank `die_rank` exits (`os._exit`, no clean-up) at the point `die_at` of
    the sharded save after optimiser step `die_step`."""

    def __init__(self, die_at: str, die_step: int, die_rank: int = 0):
        super().__init__(process_group_backend="gloo", timeout=timedelta(seconds=120))
        self.die_at, self.die_step, self.die_rank = die_at, die_step, die_rank

    def reached(self, point: str) -> None:
        if (point, self.global_rank, self.lightning_module.trainer.global_step) == (
                self.die_at, self.die_rank, self.die_step):
            os._exit(17)


# The points of a sharded save (`AtomicShardedSave.save_checkpoint`), the rank killed there and the
# step `--ckpt_path last` then holds when the save of step 2 was killed.
SAVE_POINTS = [("shards_written", 1, 1), ("staged", 0, 1), ("set_aside", 0, 2), ("swapped", 0, 2)]


@pytest.mark.parametrize(("point", "rank", "resumed_from"), SAVE_POINTS, ids=[p[0] for p in SAVE_POINTS])
def test_a_kill_at_any_point_of_a_sharded_save_resumes_exactly(point, rank, resumed_from, opd_sharded,
                                                                tmp_path_factory, tiny_checkpoints, prompts_file):
    """2-process FSDP2 saving last.ckpt (a directory) after every step, one rank killed at `point`
    of the save of step 2: `--ckpt_path last` finds a whole checkpoint (step 1's, or step 2's where
    the staged one was complete) and the resumed run's losses equal the uninterrupted run's."""
    config, gates = OPD
    killed = tmp_path_factory.mktemp(f"killed_{point}")
    checkpoints = killed / "ckpt"
    saver = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"dirpath": str(checkpoints), "save_last": True, "save_top_k": 0, "every_n_train_steps": 1}}

    def args(out, *extra):
        probe = {"class_path": "test_fsdp.Probe", "init_args": {"out": str(out), "steps": []}}
        return fit_args(config, tiny_checkpoints, prompts_file, out, [], 2, 3, gates, "--trainer.enable_checkpointing=true",
                        f"--trainer.callbacks={json.dumps([probe, saver])}", *extra)

    dying = json.dumps({"class_path": "test_fsdp.DyingStrategy",
                        "init_args": {"die_at": point, "die_step": 2, "die_rank": rank}})
    result = fit_two_processes(args(killed), killed, dying, check=False)
    assert result.returncode != 0, result.stderr[-3000:]
    last = checkpoints / "last.ckpt"
    assert last.exists() == (point != "set_aside")  # killed between the two renames: only the set-aside one
    resumed = tmp_path_factory.mktemp(f"resumed_{point}")
    fit_two_processes(args(resumed, "--ckpt_path=last"), resumed, FSDP2_CPU)
    rows, straight = json.loads((resumed / "losses.json").read_text()), losses(opd_sharded)
    assert [row["step"] for row in rows] == list(range(resumed_from + 1, 4))
    torch.testing.assert_close([row["loss"] for row in rows], straight[resumed_from:], rtol=1e-6, atol=0)
    assert read_checkpoint(last)["global_step"] == 3
    assert not staging_path(last).exists() and not aside_path(last).exists()


def test_a_torn_sharded_checkpoint_is_refused_in_one_line(tmp_path, tiny_checkpoints, prompts_file):
    """A sharded checkpoint directory without the shards' index (a save cut short by another
    writer) is refused before any model loads."""
    torn = tmp_path / "last.ckpt"
    torn.mkdir()
    torch.save({"global_step": 3}, torn / "meta.pt")
    config, gates = OPD
    with pytest.raises(SystemExit) as exit_info:
        main(fit_args(config, tiny_checkpoints, prompts_file, tmp_path, [], 2, 3, gates, f"--ckpt_path={torn}"))
    message = exit_info.value.code
    assert message.startswith("lit-opd: error: ") and "\n" not in message
    assert f"{torn}: a torn sharded checkpoint (no .metadata)" in message


@pytest.mark.parametrize("strategy", sorted((ROOT / "configs" / "strategies").glob("*.yaml")), ids=lambda p: p.stem)
def test_strategy_configs_print(strategy, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs" / "opd_block64.yaml"), "--trainer.strategy", str(strategy),
              "--trainer.devices", "2", "--print_config"])
    assert exit_info.value.code == 0
    assert "class_path: lightning.pytorch.strategies." in capsys.readouterr().out


def test_sharded_run_exports_a_plain_hf_checkpoint(opd_sharded):
    exported = AutoModelForCausalLM.from_pretrained(opd_sharded / "export")
    final = torch.load(opd_sharded / "weights_3.pt")
    assert exported.state_dict().keys() == final.keys()
    for name, value in exported.state_dict().items():
        torch.testing.assert_close(value, final[name], rtol=0, atol=0, msg=name)
    AutoTokenizer.from_pretrained(opd_sharded / "export")


def gathered_worker(rank: int, world: int, port: int, checkpoint: str) -> None:
    """One of two gloo ranks: inside `gathered` the student is whole and plain on every rank; the
    static-KV-cache engine runs no collective (rank 1 generates twice, rank 0 once); HF generate runs once
    per rank (transformers keeps FSDP-managed ranks in step itself: synced_gpus). After it the
    scorer is sharded again and a forward (all-gathers on both ranks) still lines up."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        model = AutoModelForCausalLM.from_pretrained(checkpoint)
        tokenizer = AutoTokenizer.from_pretrained(checkpoint, padding_side="left")
        whole = {name: value.clone() for name, value in model.state_dict().items()}
        scorer = CausalLMScorer(model)
        shard_scorer(scorer, init_device_mesh("cpu", (world,)), MixedPrecisionPolicy())
        batch = tokenizer(["12+13=?", "7+8=?"], return_tensors="pt", padding=True)
        ids, mask = batch["input_ids"], batch["attention_mask"].bool()
        sampling = SamplingConfig(max_new_tokens=6, temperature=0)
        generator = torch.Generator().manual_seed(rank)
        with torch.no_grad(), gathered(scorer):
            for name, value in model.named_parameters():
                assert not isinstance(value, DTensor), name
                torch.testing.assert_close(value, whole[name], rtol=0, atol=0, msg=name)
            for engine in [HFGenerateEngine()] + [StaticCacheEngine()] * (1 + rank):
                engine.generate(model, ids, mask, sampling, [tokenizer.eos_token_id], tokenizer.pad_token_id, generator)
        assert all(isinstance(p, DTensor) for p in scorer.parameters())
        with torch.no_grad():
            logp = scorer(ids, mask, 2)["logp"]
        assert logp.shape == (2, 2) and torch.isfinite(logp).all()
    finally:
        dist.destroy_process_group()


def full_tensors_worker(rank: int, world: int, port: int, checkpoint: str) -> None:
    """One of two gloo ranks: `full_tensors` of a sharded student gives every state-dict entry whole
    and plain (what the vllm engine loads), and leaves the student sharded."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        model = AutoModelForCausalLM.from_pretrained(checkpoint)
        whole = {name: value.clone() for name, value in model.state_dict().items()}
        scorer = CausalLMScorer(model)
        shard_scorer(scorer, init_device_mesh("cpu", (world,)), MixedPrecisionPolicy())
        pushed = dict(full_tensors(model))
        assert pushed.keys() == whole.keys()
        for name, value in pushed.items():
            assert not isinstance(value, DTensor), name
            torch.testing.assert_close(value, whole[name], rtol=0, atol=0, msg=name)
        assert all(isinstance(p, DTensor) for p in scorer.parameters())
        dist.barrier()  # no rank tears the group down while the other's last all-gather is in flight
    finally:
        dist.destroy_process_group()


def test_full_tensors_of_a_sharded_student_are_its_whole_weights(tiny_checkpoints):
    mp.spawn(full_tensors_worker, args=(2, free_port(), tiny_checkpoints["student"]), nprocs=2, join=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gathered_generation_runs_no_collective(tiny_checkpoints):
    mp.spawn(gathered_worker, args=(2, free_port(), tiny_checkpoints["student"]), nprocs=2, join=True)
