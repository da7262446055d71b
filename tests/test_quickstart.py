"""The quickstart's stages end to end at a tiny scale: every stage runs through the real code
(SFT Trainer, `lit-opd fit` on each of the quickstart's distillation configs, pass@k evaluation), writes what
the next stage reads, and a stage reruns alone from those files."""

import json
import subprocess
import sys

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_opd import quickstart
from lit_opd.quickstart import SFTRecipe


@pytest.fixture
def tiny_quickstart(tmp_path, monkeypatch):
    """The quickstart shrunk: 64 training and 6 held-out problems, one-layer models, 3 SFT steps,
    2 distillation steps, n=2; the distillation configs are the shipped ones with only those numbers changed."""
    shrunk = {}
    for name, stage in quickstart.DISTILL_STAGES.items():
        config = yaml.safe_load(stage.config.read_text())
        config["trainer"].update(max_steps=2, log_every_n_steps=1)
        config["model"]["init_args"]["rollout"].update(num_samples=2, max_new_tokens=24)
        config["data"].update(prompts_per_rollout=2, reuse=1, num_minibatches=2)
        for callback in config["trainer"]["callbacks"]:
            if callback["class_path"].endswith("PassAtKEvaluation"):
                callback["init_args"].update(n=2, ks=[1, 2], max_new_tokens=24)
        path = tmp_path / stage.config.name
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        shrunk[name] = stage._replace(config=path)
    recipe = dict(num_heads=2, num_kv_heads=1, steps=3, batch_size=4, lr=1e-3, warmup_steps=1)
    monkeypatch.setattr(quickstart, "DISTILL_STAGES", shrunk)
    monkeypatch.setattr(quickstart, "NUM_TRAIN", 64)
    monkeypatch.setattr(quickstart, "NUM_HELDOUT", 6)
    monkeypatch.setattr(quickstart, "EVAL_N", 2)
    monkeypatch.setattr(quickstart, "EVAL_KS", (1, 2))
    monkeypatch.setattr(quickstart, "EVAL_SAMPLING", quickstart.SamplingConfig(max_new_tokens=24))
    monkeypatch.setattr(quickstart, "TEACHER", SFTRecipe(hidden_size=32, num_layers=1, init_seed=1, **recipe))
    monkeypatch.setattr(quickstart, "STUDENT", SFTRecipe(hidden_size=16, num_layers=1, init_seed=2, **recipe))
    return tmp_path / "run"


@pytest.mark.slow
def test_every_stage_runs_and_the_opd_run_logs_pass_at_k_at_start_and_end(tiny_quickstart):
    summary = quickstart.main(["--output-dir", str(tiny_quickstart), "--threads", "1"])
    assert set(summary["seconds"]) == set(quickstart.DEFAULT_STAGES)
    quickstart.main(["--output-dir", str(tiny_quickstart), "--stages", "opd_sampled,sg_opd,eval", "--threads", "1"])

    for name in ("teacher", "student", "student_opd", "student_opd_sampled", "student_sg_opd"):
        assert (tiny_quickstart / "models" / name / "config.json").exists(), name
    results = json.loads((tiny_quickstart / "results.json").read_text())["results"]
    assert set(results) == {"teacher", "student (before OPD)", "student (after OPD)",
                            "student (after sampled-token OPD)", "student (after SG-OPD)"}
    for scores in results.values():
        assert 0.0 <= scores["pass@1"] <= scores["pass@2"] <= 1.0

    for run in ("topk_lsm_block64", "opd_sampled_block64", "sg_opd"):
        events = EventAccumulator(str(tiny_quickstart / "logs" / run))
        events.Reload()
        for k in (1, 2):
            steps = [event.step for event in events.Scalars(f"eval/heldout/pass@{k}")]
            assert steps == [0, 2], (run, k)
        assert (tiny_quickstart / f"{run}.yaml").exists()  # the stage's config, rerunnable as is
    assert "train/teacher_rollout_fraction" in events.Tags()["scalars"]


@pytest.mark.slow
def test_a_stage_reruns_alone_and_a_missing_input_names_the_stage(tiny_quickstart):
    quickstart.main(["--output-dir", str(tiny_quickstart), "--stages", "data,student", "--threads", "1"])
    with pytest.raises(SystemExit, match="run the 'teacher' stage first"):
        quickstart.main(["--output-dir", str(tiny_quickstart), "--stages", "opd", "--threads", "1"])
    summary = quickstart.main(["--output-dir", str(tiny_quickstart), "--stages", "eval", "--threads", "1"])
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


def test_the_distillation_stages_share_the_block64_gate_and_the_step_budget():
    """The stages compare methods: same student, same Block64 gate, same steps and rollout batches."""
    configs = {name: yaml.safe_load(stage.config.read_text()) for name, stage in quickstart.DISTILL_STAGES.items()}
    for name, config in configs.items():
        gates = config["model"]["init_args"]["gates"]
        assert [gate["init_args"] for gate in gates] == [
            {"unit": "block", "block_size": 64, "agg": "mean_abs", "sharpness": 1.0}
        ], name
    assert len({config["trainer"]["max_steps"] for config in configs.values()}) == 1
    assert len({yaml.safe_dump(config["data"]) for config in configs.values()}) == 1
    assert len({yaml.safe_dump(config["model"]["init_args"]["rollout"]) for config in configs.values()}) == 1
    callbacks = [c["class_path"] for c in configs["sg_opd"]["trainer"]["callbacks"]]
    assert "lit_opd.callbacks.PhasedTeacherSampling" in callbacks
