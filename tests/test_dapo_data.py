"""Paper data as the papers used it: a parquet in DAPO-Math-17k's layout (its columns, each row
repeated, the "Answer:" prompt) through the paper config, offline, on the tiny models."""

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from helpers_cli import tiny_args
from lit_opd.data.templates import MATH_INSTRUCTION, dapo_problem
from lit_opd.lightning_cli import fit_run

DAPO = ("Solve the following math problem step by step. The last line of your response should be of the form "
        "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{problem}\n\n"
        "Remember to put your answer on its own line after \"Answer:\".")
PROBLEMS = [(f"What is {i} + {i + 1}?", str(2 * i + 1)) for i in range(6)]


def dapo_row(problem: str, answer: str, index: int) -> dict:
    return {"data_source": "math_dapo", "prompt": [{"content": DAPO.format(problem=problem), "role": "user"}],
            "ability": "MATH", "reward_model": {"ground_truth": answer, "style": "rule-lang"},
            "extra_info": {"index": f"id-{index}"}}


def test_dapo_problem_comes_out_of_the_prompt():
    assert dapo_problem(DAPO.format(problem="Find $x$.\n\nIt is positive.")) == "Find $x$.\n\nIt is positive."
    assert dapo_problem("What is 1 + 1?") is None


def test_paper_config_trains_on_a_dapo_parquet(tiny_checkpoints, tmp_path, monkeypatch):
    """Every problem 3 times (as the hub's copy repeats each ~100 times): loading keeps 6, the
    prompts carry the evaluation's \\boxed{} instruction instead of DAPO's "Answer:" one, and the
    paper config (configs/opd_block64.yaml over defaults.yaml) trains on them."""
    monkeypatch.chdir(tmp_path)
    rows = [dapo_row(problem, answer, i) for repeat in range(3) for i, (problem, answer) in enumerate(PROBLEMS)]
    Dataset.from_list(rows).to_parquet(tmp_path / "dapo.parquet")
    cli = fit_run(["opd_block64"], [
        *tiny_args(tiny_checkpoints, str(tmp_path / "dapo.parquet")),
        "--trainer.max_steps=2", "--trainer.accelerator=cpu", "--trainer.precision=32-true", "--trainer.logger=false",
        "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]", "--trainer.enable_progress_bar=false",
        "--data.prompts_per_rollout=2", "--data.max_prompt_length=256",
    ])
    data = cli.datamodule
    assert data.num_duplicates == 12 and len(data.schedule.prompts) == 6
    tokenizer = cli.model.tokenizer
    texts = [tokenizer.decode(ids) for ids in data.schedule.prompts]
    assert all(MATH_INSTRUCTION in text and "Answer:" not in text for text in texts)
    assert sorted(data.schedule.answers) == sorted(answer for _, answer in PROBLEMS)
    assert cli.trainer.global_step == 2 and cli.trainer.callback_metrics["train/loss"].isfinite()
    before = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["student"]).state_dict()
    assert any(not torch.equal(value, before[name]) for name, value in cli.model.student.state_dict().items())


def test_a_row_that_is_not_a_dapo_prompt_is_named(tiny_checkpoints, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = [dapo_row(*PROBLEMS[0], 0), {**dapo_row(*PROBLEMS[1], 1), "prompt": [{"content": "1+1?", "role": "user"}]}]
    Dataset.from_list(rows).to_parquet(tmp_path / "dapo.parquet")
    with pytest.raises(ValueError, match=r"dapo.parquet:2: field 'prompt' is not a DAPO-Math prompt"):
        fit_run(["opd_block64"], [*tiny_args(tiny_checkpoints, str(tmp_path / "dapo.parquet")),
                                  "--trainer.accelerator=cpu", "--trainer.logger=false", "--trainer.callbacks=[]"])
