"""The bad-input corpus (tests/data/bad/, see its README) through the real entry points: `lit-opd
fit` / `validate` on the tiny models, the prompt DataModule and the evaluation callback. Every case
stops with exit status ≠ 0 and one line that names the file and line, or the field, before any
model is loaded (except the case whose model it is), and leaves an earlier run's files as they
were. A prompt over the length limit is no error: it is dropped and counted."""

import hashlib
import shutil
from pathlib import Path

import datasets
import pytest
import yaml
from transformers import AutoTokenizer

from lit_opd.cli import main
from lit_opd.data.prompts import PromptDataModule

ROOT = Path(__file__).resolve().parents[1]
BAD = ROOT / "tests" / "data" / "bad"
EVAL_CONFIG = str(ROOT / "configs" / "eval.yaml")


@pytest.fixture(scope="module")
def workspace(tiny_checkpoints, tmp_path_factory):
    """A fit config on the tiny models and the results of an earlier run of it (runs/bad/version_0:
    config, hparams, TensorBoard events, checkpoints) that no bad input may touch."""
    root = tmp_path_factory.mktemp("bad_inputs")
    train = root / "train.jsonl"
    train.write_text("".join(f'{{"problem": "{i}+{i}=?", "answer": "{2 * i}"}}\n' for i in range(8)))
    other_teacher = root / "other_tokenizer_teacher"
    shutil.copytree(tiny_checkpoints["teacher"], other_teacher)
    tokenizer = AutoTokenizer.from_pretrained(other_teacher)
    tokenizer.add_tokens(["<extra_token>"])
    tokenizer.save_pretrained(other_teacher)
    config = {
        "trainer": {
            "max_steps": 1, "accelerator": "cpu", "devices": 1, "precision": "32-true",
            "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(root / "runs"), "name": "bad"}},
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"save_last": True, "every_n_train_steps": 1}}],
        },
        "model": {
            "class_path": "lit_opd.modules.SampledTokenOPD",
            "init_args": {"student": tiny_checkpoints["student"], "teacher": tiny_checkpoints["teacher"],
                          "dtype": "float32",
                          "rollout": {"num_samples": 2, "max_new_tokens": 4, "engine": "static"}},
        },
        "data": {"tokenizer": tiny_checkpoints["student"], "train_data": str(train), "prompt_field": "problem",
                 "answer_field": "answer", "problem_format": "as_is", "instruction": "",
                 "max_prompt_length": 64, "prompts_per_rollout": 2, "reuse": 1},
    }
    fit_config = root / "fit.yaml"
    fit_config.write_text(yaml.safe_dump(config))
    bad_benchmark = root / "bad_benchmark.yaml"
    bad_benchmark.write_text(yaml.safe_dump({"trainer": {"callbacks": [{
        "class_path": "lit_opd.callbacks.PassAtKEvaluation",
        "init_args": {"benchmarks": [str(BAD / "missing_answer.jsonl")], "n": 2, "ks": [1], "max_new_tokens": 4},
    }]}}))
    main(["fit", "--config", str(fit_config)])
    earlier = root / "runs" / "bad" / "version_0"
    assert (earlier / "checkpoints" / "last.ckpt").is_file()
    return {"root": root, "fit": str(fit_config), "other_teacher": str(other_teacher), "earlier": earlier,
            "bad_benchmark": str(bad_benchmark), "student": tiny_checkpoints["student"]}


def fit_args(ws, *extra):
    return ["fit", "--config", ws["fit"], *extra]


def validate_args(ws, *extra):
    return ["validate", "--config", EVAL_CONFIG, *extra, f"--model.init_args.student={ws['student']}",
            f"--data.tokenizer={ws['student']}", "--model.init_args.dtype=float32", "--trainer.accelerator=cpu",
            f"--trainer.logger.init_args.save_dir={ws['root'] / 'runs'}"]


# (case, arguments, what the one-line message must contain, whether the error is the loading of a model)
CASES = [
    ("malformed_line", lambda ws: fit_args(ws, f"--data.train_data={BAD / 'malformed_line.jsonl'}"),
     ["malformed_line.jsonl:2:", "malformed JSON line"], False),
    ("missing_answer", lambda ws: fit_args(ws, f"--data.train_data={BAD / 'missing_answer.jsonl'}"),
     ["missing_answer.jsonl:3:", "no field 'answer'"], False),
    ("empty_prompt", lambda ws: fit_args(ws, f"--data.train_data={BAD / 'empty_prompt.jsonl'}"),
     ["empty_prompt.jsonl:2:", "field 'problem' is empty"], False),
    ("teacher_tokenizer", lambda ws: fit_args(ws, f"--model.init_args.teacher={ws['other_teacher']}"),
     ["other_tokenizer_teacher", "tokenizers differ", "<extra_token>"], False),
    ("missing_checkpoint", lambda ws: fit_args(ws, "--ckpt_path", str(BAD / "no_such.ckpt")),
     ["--ckpt_path", "no_such.ckpt: no such checkpoint file"], False),
    ("not_a_checkpoint", lambda ws: fit_args(ws, "--ckpt_path", str(BAD / "malformed_line.jsonl")),
     ["malformed_line.jsonl: not a checkpoint"], False),
    ("not_a_model", lambda ws: fit_args(ws, f"--model.init_args.student={BAD / 'not_a_model'}"),
     ["model.student: cannot load a causal LM from", "not_a_model"], True),
    ("unknown_benchmark", lambda ws: validate_args(ws, "--config", str(BAD / "unknown_benchmark.yaml")),
     ["'aime2024'"], False),
    ("benchmark_row_without_answer", lambda ws: validate_args(ws, "--config", ws["bad_benchmark"]),
     ["missing_answer.jsonl:3:", "no field 'answer'"], False),
]

# YAML errors are jsonargparse's: exit status 2, usage, and "error: ..." naming the key.
YAML_CASES = [
    ("unknown_key", "unknown_key.yaml", ["data.reuses"]),
    ("wrong_type", "wrong_type.yaml", ['"data.reuse"', "twice"]),
]


def digests(directory: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def model_loads(monkeypatch):
    """The roles of the models loaded (training modules and PolicyEvaluation)."""
    import lit_opd.modules.base as base
    import lit_opd.modules.policy as policy

    loads, load = [], base.load_causal_lm

    def counted(path, dtype, role, tokenizer=None):
        loads.append(role)
        return load(path, dtype, role, tokenizer)

    monkeypatch.setattr(base, "load_causal_lm", counted)
    monkeypatch.setattr(policy, "load_causal_lm", counted)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # a name that is no dataset fails fast
    return loads


@pytest.mark.parametrize(("case", "arguments", "named", "is_model_load"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_stops_with_one_line_before_long_work(case, arguments, named, is_model_load, workspace, model_loads):
    before = digests(workspace["earlier"])
    with pytest.raises(SystemExit) as exit_info:
        main(arguments(workspace))
    message = exit_info.value.code
    assert isinstance(message, str), f"exit status {message!r} instead of a one-line error"
    assert message.startswith("lit-opd: error: ") and "\n" not in message
    for text in named:
        assert text in message
    assert model_loads == (["student"] if is_model_load else [])
    assert digests(workspace["earlier"]) == before


@pytest.mark.parametrize(("case", "file", "named"), YAML_CASES, ids=[c[0] for c in YAML_CASES])
def test_bad_yaml_names_the_key(case, file, named, workspace, model_loads, capsys):
    before = digests(workspace["earlier"])
    with pytest.raises(SystemExit) as exit_info:
        main(fit_args(workspace, "--config", str(BAD / file)))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    for text in named:
        assert text in error
    assert model_loads == []
    assert digests(workspace["earlier"]) == before


def test_prompt_over_the_limit_is_dropped_and_counted(workspace, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the run without a logger writes its config.yaml here
    data = PromptDataModule(workspace["student"], str(BAD / "long_prompt.jsonl"), instruction="",
                            max_prompt_length=64, prompts_per_rollout=2)
    dropped = r"long_prompt.jsonl: dropped 1 of 5 prompts longer than data.max_prompt_length=64 tokens"
    with pytest.warns(UserWarning, match=dropped):
        data.setup("fit")
    assert data.num_filtered == 1
    assert len(data.schedule.prompts) == 4
    with pytest.warns(UserWarning, match="dropped 1 of 5 prompts"):
        main(fit_args(workspace, f"--data.train_data={BAD / 'long_prompt.jsonl'}", "--trainer.logger=false",
                      "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]"))
