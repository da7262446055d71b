"""The quickstart's stages end to end at a tiny scale: every stage runs through the real code
(SFT Trainer, `lit-opd fit` on each of the quickstart's distillation configs, pass@k evaluation), writes what
the next stage reads, and a stage reruns alone from those files."""

import hashlib
import json
import subprocess
import sys

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_opd import quickstart
from lit_opd.lightning_cli import fit_run
from lit_opd.quickstart import QuickstartSettings, SFTRecipe
from lit_opd.rollout.engine import SamplingConfig


SMALLER_FITS = {
    "trainer": {
        "max_steps": 2,
        "log_every_n_steps": 1,
        "callbacks": [
            {"class_path": "lit_opd.callbacks.PassAtKEvaluation",
             "init_args": {"benchmarks": ["data/heldout.jsonl"], "n": 2, "ks": [1, 2], "max_new_tokens": 24,
                           "at_start": True, "instruction": "", "verify_workers": 1, "progress": False}},
            {"class_path": "lit_opd.callbacks.ExportStudent"},
        ],
    },
    "model": {"init_args": {"rollout": {"num_samples": 2, "max_new_tokens": 24}}},
    "data": {"prompts_per_rollout": 2, "reuse": 1, "num_minibatches": 2},
}


@pytest.fixture
def tiny_settings(tmp_path):
    """The quickstart shrunk: 64 training and 6 held-out problems, one-layer models, 3 SFT steps,
    2 distillation steps, n=2; the distillation stages run the shipped configs with a config of
    smaller numbers laid over them."""
    smaller = tmp_path / "smaller_fits.yaml"
    smaller.write_text(yaml.safe_dump(SMALLER_FITS))
    recipe = dict(num_heads=2, num_kv_heads=1, steps=3, batch_size=4, lr=1e-3, warmup_steps=1)
    return QuickstartSettings(
        num_train=64, num_heldout=6, eval_n=2, eval_ks=(1, 2), eval_sampling=SamplingConfig(max_new_tokens=24),
        teacher=SFTRecipe(hidden_size=32, num_layers=1, init_seed=1, **recipe),
        student=SFTRecipe(hidden_size=16, num_layers=1, init_seed=2, **recipe),
        fit_args=("--config", str(smaller)),
    )


@pytest.mark.slow
def test_every_stage_runs_and_the_opd_run_logs_pass_at_k_at_start_and_end(tiny_settings, tmp_path):
    output = tmp_path / "run"
    summary = quickstart.run(output, list(quickstart.DEFAULT_STAGES), settings=tiny_settings)
    assert set(summary["seconds"]) == set(quickstart.DEFAULT_STAGES)
    quickstart.run(output, ["opd_sampled", "sg_opd", "eval"], settings=tiny_settings)

    for name in ("teacher", "student"):
        assert (output / "models" / name / "config.json").exists(), name
    for run in ("topk_lsm_block64", "opd_sampled_block64", "sg_opd"):
        assert (output / "logs" / run / "student" / "final" / "config.json").exists(), run
    results = json.loads((output / "results.json").read_text())["results"]
    assert set(results) == {"teacher", "student (before OPD)", "student (after OPD)",
                            "student (after sampled-token OPD)", "student (after SG-OPD)"}
    for scores in results.values():
        assert 0.0 <= scores["pass@1"] <= scores["pass@2"] <= 1.0

    for run in ("topk_lsm_block64", "opd_sampled_block64", "sg_opd"):
        events = EventAccumulator(str(output / "logs" / run))
        events.Reload()
        for k in (1, 2):
            steps = [event.step for event in events.Scalars(f"eval/heldout/pass@{k}")]
            assert steps == [0, 2], (run, k)
        assert (output / "logs" / run / "config.yaml").exists()  # the stage's whole config
    assert "train/teacher_rollout_fraction" in events.Tags()["scalars"]


@pytest.mark.slow
def test_a_stage_reruns_alone_and_a_missing_input_names_the_stage(tiny_settings, tmp_path):
    output = tmp_path / "run"
    quickstart.run(output, ["data", "student"], settings=tiny_settings)
    with pytest.raises(SystemExit, match="run the 'teacher' stage first"):
        quickstart.run(output, ["opd"], settings=tiny_settings)
    summary = quickstart.run(output, ["eval"], settings=tiny_settings)
    assert set(summary["results"]) == {"student (before OPD)"}


def test_the_console_command_exits_0_after_a_stage(tmp_path):
    """`lit-opd` runs `sys.exit(main())`: a value returned by main would turn a finished quickstart
    into exit status 1."""
    command = "import sys; from lit_opd.cli import main; sys.exit(main())"
    result = subprocess.run(
        [sys.executable, "-c", command, "quickstart", "--output-dir", str(tmp_path), "--stages", "data"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "data" / "heldout.jsonl").exists()


# sha256 of the granular task's data files at seed 0, as written when its teacher and student were
# trained (dbb0c29): a change here shifts the training split, and every SFT stage must be rerun.
GRANULAR_TRAIN_SHA256 = "26b1112ccf8181910c257d04a81cd5cda2a06da423a978c54c8c4d2d664e51be"
GRANULAR_HELDOUT_SHA256 = "c2c416934a0b2c58aef6e79fed9162d19ed5629bae490dfe09cbf62be095f28f"


def test_the_granular_data_stage_keeps_its_splits_and_adds_a_400_problem_evaluation_set(tmp_path):
    settings = quickstart.TASKS["granular"]
    quickstart.run(tmp_path, ["data"], settings=settings)
    layout = quickstart.Layout(tmp_path)
    assert hashlib.sha256(layout.train.read_bytes()).hexdigest() == GRANULAR_TRAIN_SHA256
    assert hashlib.sha256(layout.heldout.read_bytes()).hexdigest() == GRANULAR_HELDOUT_SHA256
    heldout = layout.heldout.read_text().splitlines()
    evaluation = layout.heldout_eval.read_text().splitlines()
    assert len(heldout) == 200 and len(evaluation) == settings.num_heldout_eval == 400
    assert evaluation[:200] == heldout
    train_problems = {json.loads(line)["problem"] for line in layout.train.read_text().splitlines()}
    rows = [json.loads(line) for line in evaluation]
    assert len({row["problem"] for row in rows}) == len({row["id"] for row in rows}) == 400
    assert not {row["problem"] for row in rows} & train_problems
    with pytest.raises(ValueError, match="num_heldout_eval"):
        QuickstartSettings(num_heldout=200, num_heldout_eval=100)


def test_the_distillation_stages_share_the_block64_gate_and_the_step_budget(capsys):
    """The stages compare methods: same student, same Block64 gate, same steps and rollout batches;
    SG-OPD adds the sign gate and phased teacher sampling."""
    configs = {}
    for name, stage in quickstart.DISTILL_STAGES.items():
        with pytest.raises(SystemExit):
            fit_run(["quickstart/base", f"quickstart/{stage.config}"], ["--print_config"])
        configs[name] = yaml.safe_load(capsys.readouterr().out)
    for name, config in configs.items():
        gates = config["model"]["init_args"]["gates"]
        assert gates[-1]["class_path"] == "lit_opd.gates.DriftGate", name
        assert {k: gates[-1]["init_args"][k] for k in ("unit", "block_size", "agg", "sharpness")} == {
            "unit": "block", "block_size": 64, "agg": "mean_abs", "sharpness": 1.0}, name
    assert len({config["trainer"]["max_steps"] for config in configs.values()}) == 1
    assert len({yaml.safe_dump(config["data"]) for config in configs.values()}) == 1
    rollouts = {name: dict(config["model"]["init_args"]["rollout"], teacher_phases=None)
                for name, config in configs.items()}
    assert len({yaml.safe_dump(rollout) for rollout in rollouts.values()}) == 1
    assert configs["sg_opd"]["model"]["init_args"]["rollout"]["teacher_phases"] == [[0, 0.5], [50, 0.25], [100, 0.0]]
    assert configs["sg_opd"]["model"]["init_args"]["gates"][0]["class_path"] == "lit_opd.gates.SignConsistencyGate"
