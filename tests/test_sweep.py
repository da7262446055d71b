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
from lit_opd.configs import config_file, shipped_configs
from lit_opd.lightning_cli import fit_run
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


# ---------------------------------------------------------------- the shipped grids, expanded without training

def shipped_grids() -> list[str]:
    return [name for name in shipped_configs()
            if name.startswith("sweeps/") and "variants" in (yaml.safe_load(config_file(name).read_text()) or {})]


def printed_config(run, capsys) -> dict:
    """The merged config of a grid run (`lit-opd fit ... --print_config`: parsed, nothing built)."""
    with pytest.raises(SystemExit) as exit_info:
        fit_run(list(run.configs), [*run.args, "--print_config"])
    assert exit_info.value.code == 0, (run.variant, capsys.readouterr().err[-2000:])
    return yaml.safe_load(capsys.readouterr().out)


def gate_label(gates: list[dict]) -> str:
    """none / token / block<size> / span / sequence, "sg_" before a sign gate's composition."""
    labels = []
    for gate in gates:
        kind, init = gate["class_path"].rsplit(".", 1)[1], gate.get("init_args", {})
        if kind == "SignConsistencyGate":
            labels.append("sg")
        else:
            assert kind == "DriftGate" and init.get("agg", "mean_abs") == "mean_abs", gate
            assert init.get("sharpness", 1.0) == 1.0, gate  # the shipped settings
            labels.append(f"block{init['block_size']}" if init["unit"] == "block" else init["unit"])
    return "_".join(labels) or "none"


def rows_per_step(config: dict) -> float:
    data = config["data"]
    return data["prompts_per_rollout"] * config["model"]["init_args"]["rollout"]["num_samples"] / data["num_minibatches"]


def test_every_shipped_grid_expands_into_runs_of_shipped_configs():
    names = shipped_grids()
    assert {"sweeps/cpu_grid", "sweeps/cpu_pilot", "sweeps/cpu_grid_reuse", "sweeps/paper_grid"} <= set(names)
    for name in names:
        spec = yaml.safe_load(config_file(name).read_text())
        grid = read_grid(str(config_file(name)))
        assert len(grid.runs) == len(spec["variants"]) * len(spec["seeds"]), name
        assert len({run.directory for run in grid.runs}) == len(grid.runs), name
        for run in grid.runs:
            for config in run.configs:
                config_file(config)  # raises for a config that is neither a file nor shipped


def test_the_pilot_runs_both_families_ungated_on_64_row_steps_on_policy_and_at_reuse_2(capsys):
    """Every run's Δ from step 0 at 200 and 400 steps on the 400-problem set; only reuse (and with
    it the prompts per rollout batch) and the learning rate vary."""
    grid = read_grid(str(config_file("sweeps/cpu_pilot")))
    assert {run.seed for run in grid.runs} == {0}
    configs = {run.variant: printed_config(run, capsys) for run in grid.runs}
    settings = set()
    for variant, config in configs.items():
        init, data = config["model"]["init_args"], config["data"]
        family = config["model"]["class_path"].rsplit(".", 1)[1]
        assert init["gates"] == [] and config["trainer"]["max_steps"] == 400, variant
        assert rows_per_step(config) == 64, variant
        assert data["reuse"] == int(variant.split("_reuse")[1][0]) and init["optim"]["lr"] == float(variant.split("_lr")[1])
        if data["reuse"] == 1:  # pure on-policy: one optimiser step per rollout batch, ρ = 1
            assert data["num_minibatches"] == 1, variant
        evaluation = config["trainer"]["callbacks"][0]
        assert evaluation["class_path"] == "lit_opd.callbacks.PassAtKEvaluation"
        assert evaluation["init_args"]["benchmarks"] == ["data/heldout_eval.jsonl"]
        assert evaluation["init_args"]["max_problems"] is None and evaluation["init_args"]["ks"] == [1, 8]
        assert [evaluation["init_args"][key] for key in ("every_n_steps", "at_start", "at_end")] == [200, True, True]
        settings.add((family, data["reuse"]))
    assert settings == {(family, reuse) for family in ("SampledTokenOPD", "TeacherTopKLSM") for reuse in (1, 2)}


def test_the_reuse_grid_runs_every_gate_of_both_families_at_reuse_2_and_8_with_the_steps_held(capsys):
    grid = read_grid(str(config_file("sweeps/cpu_grid_reuse")))
    assert {run.seed for run in grid.runs} == {0, 1, 2}
    seen, rest = {}, {}
    for run in grid.runs:
        if run.seed != 0:
            continue
        config = printed_config(run, capsys)
        init, data = config["model"]["init_args"], config["data"]
        family = {"SampledTokenOPD": "opd", "TeacherTopKLSM": "topk_lsm"}[config["model"]["class_path"].rsplit(".", 1)[1]]
        key = (family, gate_label(init["gates"]), data["reuse"])
        assert key not in seen, run.variant
        seen[key] = run.variant
        assert run.variant.endswith(f"_r{data['reuse']}") and run.variant.startswith(("sg_" if "sg" in key[1] else "") + family)
        assert config["trainer"]["max_steps"] == 400 and rows_per_step(config) == 64, run.variant
        assert data["reuse"] * data["num_minibatches"] in (4, 16), run.variant
        phases = init["rollout"]["teacher_phases"]
        if key[1].startswith("sg"):  # SG-OPD's cold start in thirds of the budget
            assert [list(phase) for phase in phases] == [[0, 0.5], [133, 0.25], [267, 0.0]], run.variant
        else:
            assert not phases, run.variant
        if key[1] == "block16":  # logs every unit's weights on this run's drift
            assert init["gates"][0]["init_args"]["unit_statistics"], run.variant
        # within a family only the gates, the reuse and SG's teacher phases differ
        comparable = {**init, "gates": None, "rollout": {**init["rollout"], "teacher_phases": None}}
        rest.setdefault(family, []).append((run.variant, yaml.safe_dump(comparable), yaml.safe_dump({**data, "reuse": None})))
    gates = ("none", "token", "block16", "span", "sequence", "sg_block16")
    assert set(seen) == {(family, gate, reuse) for family in ("opd", "topk_lsm") for gate in gates for reuse in (2, 8)}
    for family, runs in rest.items():
        assert len({model for _, model, _ in runs}) == 1, (family, [variant for variant, _, _ in runs])
        assert len({data for _, _, data in runs}) == 1, family


def test_the_paper_grid_gates_both_families_by_span_and_runs_sg_opd_on_both(capsys):
    grid = read_grid(str(config_file("sweeps/paper_grid")))
    labels = {}
    for run in grid.runs:
        if run.seed == 0:
            config = printed_config(run, capsys)
            family = config["model"]["class_path"].rsplit(".", 1)[1]
            labels[run.variant] = (family, gate_label(config["model"]["init_args"]["gates"]))
    assert labels["topk_lsm_span"] == ("TeacherTopKLSM", "span")
    assert labels["sg_topk_lsm"] == ("TeacherTopKLSM", "sg")
    assert labels["sg_opd"] == ("SampledTokenOPD", "sg")
    for family in ("SampledTokenOPD", "TeacherTopKLSM"):
        assert {"none", "block64", "span", "sg"} <= {gate for fam, gate in labels.values() if fam == family}, family


def test_sweep_gains_hand_values(tmp_path):
    """benchmarks/sweep_gains.py on one run of two problems evaluated at steps 0 and 4, and its
    event file: the change from step 0 with its interval, the reverse KL's first and last tenth,
    and the drift and gate minimum on the last reuse epoch's steps."""
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "opd_r2" / "seed0"
    run.mkdir(parents=True)
    for step, values in ((0, [0.0, 0.5]), (4, [0.5, 1.0])):
        rows = [{"step": step, "benchmark": "b", "index": i, "pass@1": v, "pass@8": 1.0} for i, v in enumerate(values)]
        (run / f"fit_step{step}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    writer = SummaryWriter(str(run))
    for step in range(20):  # reuse 2: reuse_index 0, 0, 1, 1, ...; drift 0.1·step on the second epoch
        reuse = (step // 2) % 2
        scalars = {"train/reverse_kl": 1.0 if step < 2 else 0.5 if step < 18 else 0.25, "train/reuse_index": reuse,
                   "train/drift_abs_mean": 0.1 * step * reuse, "train/gate_min": 1.0 - 0.01 * step * reuse}
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, step)
    writer.close()
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sweep_gains.py"), str(tmp_path), "--json"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    output = json.loads(result.stdout)
    steps = output["gains"]["opd_r2"]
    assert steps["0"] == {"pass@1": [0.25], "pass@8": [1.0]}
    assert steps["4"]["pass@1"] == pytest.approx([0.75, 0.5, 0.5, 0.5])  # every problem +0.5: the interval collapses
    assert steps["4"]["pass@8"] == pytest.approx([1.0, 0.0, 0.0, 0.0])
    drift = output["drift"]["opd_r2"]
    # second-epoch steps: 2, 3, 6, 7, 10, 11, 14, 15, 18, 19 (mean 10.5)
    assert drift["last_epoch/drift_abs_mean"] == pytest.approx(1.05)
    assert drift["last_epoch/gate_min"] == pytest.approx(1.0 - 0.105)
    assert drift["reverse_kl_first_tenth"] == pytest.approx(1.0) and drift["reverse_kl_last_tenth"] == pytest.approx(0.25)


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
