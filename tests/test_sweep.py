"""`lit-opd sweep` and `lit-opd report --sweep` at CI size: a grid of 2 variants × 2 seeds × 2
steps on the tiny models, killed between runs and started again, then the papers' table."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers_cli import OVERRIDES, tiny_args
from lit_opd.sweep import read_grid, run_grid
from lit_opd.sweep_report import paired_bootstrap, sweep_report

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
UNIT_STATISTICS = ('--model.init_args.gates=[{"class_path": "lit_opd.gates.DriftGate", '
                   '"init_args": {"unit": "block", "block_size": 4, "unit_statistics": true}}]')


@pytest.fixture
def grid_file(tiny_checkpoints, tmp_path, write_prompts):
    prompts, bench = write_prompts(), tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps({"id": str(i), "problem": f"{i}+1=?", "answer": str(i + 1)}) + "\n"
                             for i in range(3)))
    evaluation = [{"class_path": "lit_opd.callbacks.PassAtKEvaluation",
                   "init_args": {"benchmarks": [str(bench)], "n": 2, "ks": [1, 2], "max_new_tokens": 6,
                                 "at_start": True, "verify_workers": 1, "progress": False}}]
    grid = {
        "output_dir": str(tmp_path / "sweep"),
        "seeds": [0, 1],
        "args": [*tiny_args(tiny_checkpoints, str(prompts)), f"--trainer.callbacks={json.dumps(evaluation)}"],
        "variants": {
            "opd": {"configs": ["opd", OVERRIDES]},
            "opd_block64": {"configs": ["opd_block64", OVERRIDES], "args": [UNIT_STATISTICS]},
        },
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def test_a_killed_sweep_skips_finished_runs_and_the_report_reads_them(grid_file, tmp_path):
    grid = read_grid(str(grid_file))
    assert [(run.variant, run.seed) for run in grid.runs] == [("opd", 0), ("opd", 1), ("opd_block64", 0),
                                                              ("opd_block64", 1)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    sweep = subprocess.Popen([sys.executable, "-m", "lit_opd", "sweep", str(grid_file)], env=env,
                             start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not grid.runs[0].done.exists() and time.time() < deadline and sweep.poll() is None:
        time.sleep(0.5)
    os.killpg(sweep.pid, signal.SIGKILL)  # the sweep and the run it had started
    sweep.wait()
    assert grid.runs[0].done.exists() and not grid.runs[-1].done.exists()
    first = grid.runs[0].done.read_text()

    finished = run_grid(read_grid(str(grid_file)))
    assert grid.runs[0] not in finished and len(finished) >= 3
    assert grid.runs[0].done.read_text() == first
    assert all(run.done.exists() for run in grid.runs)

    markdown, curve, gates = sweep_report(str(tmp_path / "sweep"), str(tmp_path / "report"), baseline="opd")
    table = markdown.read_text()
    assert curve.is_file() and gates.is_file()
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| opd")}
    assert set(rows) == {"opd", "opd_block64"}
    for variant, row in rows.items():
        finals = []
        for seed in (0, 1):
            events = EventAccumulator(str(tmp_path / "sweep" / variant / f"seed{seed}"))
            events.Reload()
            finals.append(events.Scalars("eval/mean/pass@1")[-1].value)
        mean_cell = row.split(" | ")[3]  # variant | seeds | bench | mean | Δ
        assert float(mean_cell.split(" ± ")[0]) == pytest.approx(sum(finals) / 2, abs=6e-4), (variant, table)
    assert rows["opd"].rstrip(" |").endswith("–") and "[" in rows["opd_block64"]

    units = {line.split(" | ")[0].strip("| "): line.strip("| ").split(" | ")[1:] for line in table.splitlines()
             if line.startswith(("| token", "| block", "| span", "| sequence"))}
    assert "Gate weights per unit on opd_block64" in table and list(units) == ["token", "block", "span", "sequence"]
    stds = []
    for seed in (0, 1):
        events = EventAccumulator(str(tmp_path / "sweep" / "opd_block64" / f"seed{seed}"))
        events.Reload()
        stds += [event.value for event in events.Scalars("train/gate_units/token/std")]
    assert float(units["token"][0]) == pytest.approx(sum(stds) / len(stds), abs=6e-4)


def test_paired_bootstrap_hand_values():
    import numpy as np

    baseline = {"a": np.array([[0.0, 1.0], [0.5, 0.5]])}
    variant = {"a": baseline["a"] + 0.25}  # every (seed, problem) 0.25 higher: the CI collapses on it
    assert paired_bootstrap(variant, baseline) == pytest.approx((0.25, 0.25, 0.25))


def test_sweep_table_hand_values(tmp_path):
    """Two variants × two seeds × one benchmark of two problems; the final step counts."""
    pass_at_1 = {("opd", 0): [0.0, 0.5], ("opd", 1): [0.5, 0.5], ("gated", 0): [0.5, 1.0], ("gated", 1): [0.5, 1.0]}
    for (variant, seed), values in pass_at_1.items():
        run = tmp_path / variant / f"seed{seed}"
        run.mkdir(parents=True)
        early = [{"step": 0, "benchmark": "b", "index": i, "pass@1": 0.0} for i in range(2)]
        (run / "fit_step0.jsonl").write_text("".join(json.dumps(row) + "\n" for row in early))
        final = [{"step": 4, "benchmark": "b", "index": i, "pass@1": v} for i, v in enumerate(values)]
        (run / "fit_step4.jsonl").write_text("".join(json.dumps(row) + "\n" for row in final))
    from lit_opd.sweep_report import read_sweep, sweep_table

    table = sweep_table(read_sweep(tmp_path), "opd", ["pass@1"])
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in table.splitlines() if line.startswith("| ")}
    # opd per seed: 0.25, 0.5 → mean 0.375, std (ddof 1) 0.177; gated: 0.75, 0.75 → 0.75 ± 0
    assert rows["opd"][2] == "0.375 ± 0.177" and rows["opd"][3] == "0.375 ± 0.177"
    assert rows["gated"][2] == "0.750 ± 0.000"
    assert rows["gated"][4].startswith("+0.375 [")  # Δ = 0.75 − 0.375, paired by seed and problem
