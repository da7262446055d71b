"""`lit-opd sweep GRID.yaml`: a grid of variants × seeds, one `lit-opd fit` run after another.

    output_dir: sweeps/cpu_grid          # each run: <output_dir>/<variant>/seed<seed>/ (a TensorBoard run dir)
    seeds: [0, 1, 2]
    configs: [quickstart/base]           # config files (paths or shipped names) every run starts from
    args: ["--trainer.max_steps=100"]    # `lit-opd fit` arguments every run gets
    variants:                            # name → its own config files and arguments
      opd: {configs: [quickstart/opd_sampled_block64], args: ["--model.init_args.gates=[]"]}

Each run is an ordinary `lit-opd fit` in a process of its own, seeded with `--model.init_args.seed`
and `--data.seed`, logging to its run directory and resuming with `--ckpt_path last` (checkpoints
are the configs' own ModelCheckpoint's). A finished run leaves `done.json`; a sweep started again
skips finished runs and resumes an unfinished one from its last checkpoint. Relative paths in the
grid file resolve against the working directory, as on the command line.
"""

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml


@dataclass(frozen=True)
class Run:
    variant: str
    seed: int
    configs: tuple[str, ...]
    args: tuple[str, ...]
    output_dir: Path

    @property
    def directory(self) -> Path:
        return self.output_dir / self.variant / f"seed{self.seed}"

    @property
    def done(self) -> Path:
        return self.directory / "done.json"

    def command(self) -> list[str]:
        """The run's `lit-opd fit` command line (this interpreter's lit_opd)."""
        configs = [arg for config in self.configs for arg in ("--config", config)]
        return [sys.executable, "-m", "lit_opd", "fit", *configs, *self.args,
                f"--model.init_args.seed={self.seed}", f"--data.seed={self.seed}",
                "--trainer.logger=lightning.pytorch.loggers.TensorBoardLogger",
                f"--trainer.logger.init_args.save_dir={self.output_dir / self.variant}",
                f"--trainer.logger.init_args.name=seed{self.seed}", "--trainer.logger.init_args.version=",
                "--ckpt_path=last"]


@dataclass
class Grid:
    output_dir: Path
    runs: list[Run] = field(default_factory=list)


def read_grid(path: str) -> Grid:
    """The runs of a grid file, variants in file order, seeds inner; errors name the file and key."""
    try:
        spec = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(f"{path}: cannot read the grid ({error})") from None
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: a grid is a mapping (output_dir, seeds, configs, args, variants)")
    unknown = set(spec) - {"output_dir", "seeds", "configs", "args", "variants"}
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}")
    for key in ("output_dir", "seeds", "variants"):
        if not spec.get(key):
            raise ValueError(f"{path}: {key} is required")
    if not all(isinstance(seed, int) for seed in spec["seeds"]):
        raise ValueError(f"{path}: seeds must be integers, got {spec['seeds']}")
    output_dir = Path(spec["output_dir"])
    grid = Grid(output_dir)
    for name, variant in spec["variants"].items():
        variant = variant or {}
        unknown = set(variant) - {"configs", "args"}
        if unknown:
            raise ValueError(f"{path}: variants.{name}: unknown key(s) {sorted(unknown)}")
        configs = tuple(spec.get("configs", [])) + tuple(variant.get("configs", []))
        args = tuple(spec.get("args", [])) + tuple(variant.get("args", []))
        grid.runs += [Run(name, seed, configs, args, output_dir) for seed in spec["seeds"]]
    return grid


def run_grid(grid: Grid) -> list[Run]:
    """Run every unfinished run of `grid` in turn (resuming a started one); returns the runs done
    now. Progress: runs done / left and the time left at the mean time of this sweep's runs."""
    pending = [run for run in grid.runs if not run.done.exists()]
    print(f"[sweep] {len(grid.runs)} runs: {len(grid.runs) - len(pending)} done, {len(pending)} to run "
          f"(output in {grid.output_dir})", flush=True)
    finished, seconds = [], []
    for index, run in enumerate(pending):
        left = "" if not seconds else f", ~{sum(seconds) / len(seconds) * (len(pending) - index) / 60:.0f} min left"
        print(f"[sweep] run {index + 1}/{len(pending)}: {run.variant} seed {run.seed}{left}", flush=True)
        run.directory.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        result = subprocess.run(run.command())
        if result.returncode != 0:
            raise SystemExit(f"lit-opd sweep: {run.variant} seed {run.seed} failed (exit {result.returncode}); "
                             f"start the sweep again to resume it: {' '.join(run.command())}")
        seconds.append(time.perf_counter() - started)
        run.done.write_text(json.dumps({"variant": run.variant, "seed": run.seed, "seconds": seconds[-1]}))
        finished.append(run)
    print(f"[sweep] all {len(grid.runs)} runs done", flush=True)
    return finished


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lit-opd sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("grid", help="the grid YAML (a path, or a shipped name such as sweeps/paper_grid)")
    parser.add_argument("--dry-run", action="store_true", help="print each run's command and whether it is done")
    args = parser.parse_args(argv)
    from lit_opd.configs import config_file

    grid = read_grid(str(config_file(args.grid)))
    if args.dry_run:
        for run in grid.runs:
            print(("done  " if run.done.exists() else "to run"), " ".join(run.command()))
        return
    run_grid(grid)
