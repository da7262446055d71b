"""The bad-input corpus (tests/data/bad/, see its README) through the real entry points: `lit-opd
fit` / `validate` on the tiny models, the prompt DataModule and the evaluation callback. Every case
stops with exit status ≠ 0 and one line that names the file and line, or the field, before any
model is loaded (except the case whose model it is), and leaves an earlier run's files as they
were. A prompt over the length limit is no error: it is dropped and counted."""

import hashlib
import json
import shutil
from pathlib import Path

import datasets
import pytest
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers_cli import closed_port
from lit_opd.cli import main
from lit_opd.data.prompts import PromptDataModule

ROOT = Path(__file__).resolve().parents[1]
BAD = ROOT / "tests" / "data" / "bad"
EVAL_CONFIG = str(ROOT / "configs" / "eval.yaml")


@pytest.fixture(scope="module")
def workspace(tiny_checkpoints, tmp_path_factory, write_prompts):
    """A fit config on the tiny models and the results of an earlier run of it (runs/bad/version_0:
    config, hparams, TensorBoard events, checkpoints) that no bad input may touch."""
    root = tmp_path_factory.mktemp("bad_inputs")
    train = write_prompts()
    other_teacher = root / "other_tokenizer_teacher"
    shutil.copytree(tiny_checkpoints["teacher"], other_teacher)
    tokenizer = AutoTokenizer.from_pretrained(other_teacher)
    tokenizer.add_tokens(["<extra_token>"])
    tokenizer.save_pretrained(other_teacher)
    wide_teacher = root / "wide_teacher"  # the same tokenizer, 16 more embedding rows than the student
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["teacher"])
    model.resize_token_embeddings(model.get_input_embeddings().weight.shape[0] + 16)
    model.save_pretrained(wide_teacher)
    AutoTokenizer.from_pretrained(tiny_checkpoints["teacher"]).save_pretrained(wide_teacher)
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
    no_chat_template = root / "no_chat_template"  # the student, its tokenizer without a chat template
    shutil.copytree(tiny_checkpoints["student"], no_chat_template)
    tokenizer = AutoTokenizer.from_pretrained(no_chat_template)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(no_chat_template)
    for leftover in no_chat_template.glob("chat_template.*"):
        leftover.unlink()
    return {"root": root, "fit": str(fit_config), "no_chat_template": str(no_chat_template), "other_teacher": str(other_teacher), "earlier": earlier,
            "wide_teacher": str(wide_teacher),
            "bad_benchmark": str(bad_benchmark), "student": tiny_checkpoints["student"]}


def fit_args(ws, *extra):
    return ["fit", "--config", ws["fit"], *extra]


def validate_args(ws, *extra):
    return ["validate", "--config", EVAL_CONFIG, *extra, f"--model.init_args.student={ws['student']}",
            f"--data.tokenizer={ws['student']}", "--model.init_args.dtype=float32", "--trainer.accelerator=cpu",
            f"--trainer.logger.init_args.save_dir={ws['root'] / 'runs'}"]


TOPK = "--model.class_path=lit_opd.modules.TeacherTopKLSM"


def gates(*gate: dict) -> str:
    return f"--model.init_args.gates={json.dumps(list(gate))}"


# (case, arguments, what the one-line message must contain, whether the error is the loading of a model)
CASES = [
    ("chunk_size_negative", lambda ws: fit_args(ws, "--model.init_args.chunk_size=-1"),
     ["model.init_args.chunk_size must be ≥ 1, got -1"], False),
    ("chunk_size_zero", lambda ws: fit_args(ws, "--model.init_args.chunk_size=0"),
     ["model.init_args.chunk_size must be ≥ 1, got 0"], False),
    ("micro_batch_tokens_negative", lambda ws: fit_args(ws, "--model.init_args.micro_batch_tokens=-8"),
     ["model.init_args.micro_batch_tokens must be ≥ 0, got -8"], False),
    ("max_nonfinite_steps_zero", lambda ws: fit_args(ws, "--model.init_args.max_nonfinite_steps=0"),
     ["model.init_args.max_nonfinite_steps must be ≥ 1, got 0"], False),
    ("num_samples_zero", lambda ws: fit_args(ws, "--model.init_args.rollout.num_samples=0"),
     ["model.init_args.rollout.num_samples must be ≥ 1, got 0"], False),
    ("max_new_tokens_zero", lambda ws: fit_args(ws, "--model.init_args.rollout.max_new_tokens=0"),
     ["model.init_args.rollout.max_new_tokens must be ≥ 1, got 0"], False),
    ("temperature_negative", lambda ws: fit_args(ws, "--model.init_args.rollout.temperature=-0.5"),
     ["model.init_args.rollout.temperature must be ≥ 0, got -0.5"], False),
    ("top_p_zero", lambda ws: fit_args(ws, "--model.init_args.rollout.top_p=0"),
     ["model.init_args.rollout.top_p must be in (0, 1], got 0"], False),
    ("score_batch_size_zero", lambda ws: fit_args(ws, "--model.init_args.rollout.score_batch_size=0"),
     ["model.init_args.rollout.score_batch_size must be ≥ 1, got 0"], False),
    ("lr_negative", lambda ws: fit_args(ws, "--model.init_args.optim.lr=-0.1"),
     ["model.init_args.optim.lr must be ≥ 0, got -0.1"], False),
    ("beta2_one", lambda ws: fit_args(ws, "--model.init_args.optim.betas=[0.9, 1.0]"),
     ["model.init_args.optim.betas[1] must be in [0, 1), got 1.0"], False),
    ("weight_decay_negative", lambda ws: fit_args(ws, "--model.init_args.optim.weight_decay=-1"),
     ["model.init_args.optim.weight_decay must be ≥ 0, got -1"], False),
    ("clip_value_zero", lambda ws: fit_args(ws, "--model.init_args.optim.gradient_clip_val=0"),
     ["model.init_args.optim.gradient_clip_val must be > 0 or null, got 0"], False),
    ("block_size_zero", lambda ws: fit_args(ws, gates({"class_path": "lit_opd.gates.DriftGate",
                                                       "init_args": {"block_size": 0}})),
     ["model.init_args.gates: DriftGate.block_size must be ≥ 1, got 0"], False),
    ("sharpness_negative", lambda ws: fit_args(ws, gates({"class_path": "lit_opd.gates.DriftGate",
                                                          "init_args": {"sharpness": -1.0}})),
     ["DriftGate.sharpness must be ≥ 0, got -1.0"], False),
    ("g_min_above_g_max", lambda ws: fit_args(ws, gates({"class_path": "lit_opd.gates.DriftGate",
                                                         "init_args": {"g_min": 2.0, "g_max": 1.0}})),
     ["DriftGate.g_min must be ≤ g_max, got 2.0 > 1.0"], False),
    ("sign_gate_beta_one", lambda ws: fit_args(ws, gates({"class_path": "lit_opd.gates.SignConsistencyGate",
                                                          "init_args": {"beta": 1.0}})),
     ["SignConsistencyGate.beta must be in [0, 1), got 1.0"], False),
    ("top_k_zero", lambda ws: fit_args(ws, TOPK, "--model.init_args.top_k=0"),
     ["model.init_args.top_k must be ≥ 1, got 0"], False),
    ("top_k_above_the_vocabulary", lambda ws: fit_args(ws, TOPK, "--model.init_args.top_k=100000"),
     ["model.init_args.top_k: 100000 (+ 0 masked special tokens) is more than the"], False),
    ("teacher_with_more_rows", lambda ws: fit_args(ws, TOPK, f"--model.init_args.teacher={ws['wide_teacher']}"),
     ["model.init_args.teacher:", "wide_teacher", "embedding rows, more than the student's"], False),
    ("max_prompts_zero", lambda ws: fit_args(ws, "--data.max_prompts=0"),
     ["data.max_prompts must be ≥ 1 or null, got 0"], False),
    ("teacher_retry_budget_beyond_the_collective_timeout",
     lambda ws: fit_args(ws, "--model.init_args.teacher_url=http://127.0.0.1:9",
                         "--model.init_args.teacher_serving.timeout_s=600", "--trainer.devices=2",
                         f"--trainer.strategy={ROOT / 'configs' / 'strategies' / 'fsdp2_cpu.yaml'}"),
     ["model.init_args.teacher_serving: 6 tries × timeout_s 600 s + backoff = 3662 s, beyond the strategy's "
      "collective timeout of 1800 s", "trainer.strategy.init_args.timeout"], False),
    ("teacher_server_unreachable", lambda ws: fit_args(ws, f"--model.init_args.teacher_url=http://127.0.0.1:{closed_port()}",
                                                       "--model.init_args.teacher_serving.retries=0"),
     ["gave no usable answer in 1 tries", "; wrote ", "last.ckpt: resume with --ckpt_path last"], True),
    ("validate_with_a_tokenizer_without_chat_template",
     lambda ws: [*validate_args(ws, "--trainer.callbacks.init_args.benchmarks=[aime24]",
                                "--trainer.callbacks.init_args.max_problems=1",
                                "--trainer.callbacks.init_args.max_new_tokens=4"),
                 f"--data.tokenizer={ws['no_chat_template']}"],
     ["validate: the pass@k evaluation failed, no metrics were written", "has no chat template: set "
      "data.chat_template=false"], True),
    ("eval_top_p", lambda ws: validate_args(ws, "--trainer.callbacks.init_args.top_p=1.5"),
     ["PassAtKEvaluation.top_p must be in (0, 1], got 1.5"], False),
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

# Errors of the YAML and the command line (jsonargparse's): exit status 2 and one line naming the key.
YAML_CASES = [
    ("unknown_key", ["--config", str(BAD / "unknown_key.yaml")], ["data.reuses"]),
    ("wrong_type", ["--config", str(BAD / "wrong_type.yaml")], ['"data.reuse"', "twice"]),
    ("unknown_gate", [gates({"class_path": "lit_opd.gates.NoSuchGate"})],
     ["model.init_args.gates: class_path 'lit_opd.gates.NoSuchGate': module 'lit_opd.gates' has no attribute"]),
]


def digests(directory: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def model_loads(monkeypatch):
    """The roles of the models loaded (training modules and PolicyEvaluation)."""
    import lit_opd.modules.assembly as assembly
    import lit_opd.modules.policy as policy
    import lit_opd.rollout.factory as factory

    loads, load = [], assembly.load_causal_lm

    def counted(path, dtype, role, tokenizer=None):
        loads.append(role)
        return load(path, dtype, role, tokenizer)

    for module in (assembly, factory, policy):  # the student, the teacher in the trainer, a plain model
        monkeypatch.setattr(module, "load_causal_lm", counted)
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


@pytest.mark.parametrize(("case", "arguments", "named"), YAML_CASES, ids=[c[0] for c in YAML_CASES])
def test_bad_yaml_names_the_key(case, arguments, named, workspace, model_loads, capsys):
    before = digests(workspace["earlier"])
    with pytest.raises(SystemExit) as exit_info:
        main(fit_args(workspace, *arguments))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("lit-opd: error: ") and error.count("\n") == 1, error
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


@pytest.mark.parametrize("case", ["empty_run", "missing_run", "empty_sweep", "missing_sweep"])
def test_a_report_of_nothing_stops_with_one_line(case, tmp_path):
    (tmp_path / "empty").mkdir()
    directory = tmp_path / ("empty" if case.startswith("empty") else "missing")
    arguments = ["--sweep", str(directory)] if case.endswith("sweep") else [str(directory)]
    with pytest.raises(SystemExit) as exit_info:
        main(["report", *arguments, "--output", str(tmp_path / "report")])
    message = exit_info.value.code
    assert isinstance(message, str) and message.startswith("lit-opd: error: ") and "\n" not in message
    assert str(directory) in message
