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
def grid_file(tiny_checkpoints, tmp_path):
    prompts, bench = tmp_path / "train.jsonl", tmp_path / "bench.jsonl"
    prompts.write_text("".join(json.dumps({"problem": f"{i}+{i}=?", "answer": str(2 * i)}) + "\n" for i in range(8)))
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
    stds, first_steps = [], 0
    for seed in (0, 1):
        events = EventAccumulator(str(tmp_path / "sweep" / "opd_block64" / f"seed{seed}"))
        events.Reload()
        undrifted = {event.step for event in events.Scalars("train/drift_abs_mean") if event.value == 0.0}
        first_steps += len(undrifted)
        stds += [event.value for event in events.Scalars("train/gate_units/token/std") if event.step not in undrifted]
    assert first_steps > 0 and stds  # rollout batches' first steps (every gate 1) are left out, reuse steps kept
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


def write_runs(root, scores: dict[tuple[str, int], dict[int, list[float]]]) -> None:
    """fit_step<step>.jsonl of benchmark "b" per (variant, seed): {step: pass@1 per problem}."""
    for (variant, seed), steps in scores.items():
        run = root / variant / f"seed{seed}"
        run.mkdir(parents=True)
        for step, values in steps.items():
            rows = [{"step": step, "benchmark": "b", "index": i, "pass@1": v} for i, v in enumerate(values)]
            (run / f"fit_step{step}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_every_run_is_read_at_the_last_step_all_reached_and_only_common_seeds_are_paired(tmp_path):
    """opd has seeds 0-2 evaluated at steps 0, 2, 4; gated's seed 1 stopped after step 2 and it has
    no seed 2; solo has seed 2 only. Every run is read at step 2 (the table says so), gated is
    paired with opd on seeds 0 and 1, solo on seed 2 alone."""
    scores = {("opd", s): {0: [0.0, 0.0], 2: [0.25 * s, 0.5], 4: [1.0, 1.0]} for s in (0, 1, 2)}
    scores |= {("gated", 0): {0: [0.0, 0.0], 2: [0.5, 0.5], 4: [0.0, 0.0]}, ("gated", 1): {0: [0.0, 0.0], 2: [1.0, 0.5]},
               ("solo", 2): {0: [0.0, 0.0], 2: [1.0, 1.0], 4: [1.0, 1.0]}}
    write_runs(tmp_path, scores)
    from lit_opd.sweep_report import read_sweep, sweep_table

    table = sweep_table(read_sweep(tmp_path), "opd", ["pass@1"])
    assert "### pass@1 at step 2, the last step every seed of every variant evaluated" in table
    rows = {line.split(" | ")[0].strip("| "): line.strip(" |").split(" | ") for line in table.splitlines()
            if line.startswith("| ") and not line.startswith("| variant")}
    # at step 2, per seed: opd 0.25, 0.375, 0.5; gated 0.5, 0.75; solo 1.0
    assert rows["opd"][1:4] == ["3", "0.375 ± 0.125", "0.375 ± 0.125"]
    assert rows["gated"][1:3] == ["2", "0.625 ± 0.177"]
    # paired on seeds 0 and 1: Δ = mean(0.5 − 0.25, 0.75 − 0.375) = 0.3125; solo on seed 2: 1.0 − 0.5
    assert rows["gated"][4].startswith("+0.312 [") and rows["gated"][5] == "0, 1"
    assert rows["solo"][4].startswith("+0.500 [") and rows["solo"][5] == "2"


def test_a_sweep_without_a_common_step_is_refused(tmp_path):
    write_runs(tmp_path, {("opd", 0): {2: [1.0]}, ("gated", 0): {4: [1.0]}})
    from lit_opd.sweep_report import read_sweep, sweep_table

    with pytest.raises(ValueError, match=r"no step that every run evaluated .*'opd/seed0': 2"):
        sweep_table(read_sweep(tmp_path), "opd", ["pass@1"])
