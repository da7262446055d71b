"""benchmarks/gpu_check.py --tiny: the GPU check's code (model building, teacher scoring, every
engine, `opd_block64`'s optimiser steps through a Trainer) runs on the CPU and reports every part."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_gpu_check_tiny_reports_every_part():
    done = subprocess.run([sys.executable, str(SCRIPT), "--tiny"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["errors"] == {}
    assert report["teacher_scoring"]["tokens_per_s"] > 0
    assert {"hf", "static", "static_float32_autocast"} <= set(report["generation"])
    for engine in report["generation"].values():
        assert 0 < engine["tokens"] <= 4 * 8 and engine["tokens_per_s"] > 0  # 4 rows × at most 8 new tokens
    assert 0 <= report["generation"]["static"]["greedy_match_hf"] <= 1
    assert report["generation"]["hf"]["greedy_match_hf"] == 1
    step = report["train_step"]
    assert step["config"] == "opd_block64" and step["rows"] == 8
    assert step["padded_tokens"] > step["micro_batch_tokens"]  # the budget cuts the step into micro-batches
    assert step["step_s"] > 0 and step["tokens_per_s"] > 0 and step["projected_step_gib"] > 0
    assert step["first_step_perf"]["generate_s"] > 0
