"""pass@k evaluation: PassAtKMetric (hand values, DDP reduction), `evaluate`, the
PassAtKEvaluation callback in a real Trainer (fit, validate, test, DDP), and `lit-opd report`."""

import json
import logging
import shutil

import lightning as L
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from lit_opd.callbacks import PassAtKEvaluation
from lit_opd.data.benchmarks import Problem
from lit_opd.data.char_tokenizer import build_char_tokenizer
from lit_opd.data.templates import PromptTemplate, eos_token_ids
from lit_opd.evaluation import PassAtKMetric, ProblemResult, evaluate, model_generate_fn
from lit_opd.report import main as report_main
from lit_opd.report import read_run
from lit_opd.rollout.engine import HFGenerateEngine, SamplingConfig
from lit_opd.tiny import tiny_qwen3
from lit_opd.verify import Verifier

SCRIPT = "\\boxed{7}"
# Answers to the scripted model's "\boxed{7}": right, right (an equivalent form), wrong.
PROBLEMS = [
    {"id": "add", "problem": "What is 3 + 4?", "answer": "7"},
    {"id": "dec", "problem": "Write 7 with one decimal.", "answer": "7.0"},
    {"id": "eight", "problem": "What is 2^3?", "answer": "8"},
]


def scripted_lm(tokenizer, script: str = SCRIPT):
    """A tiny Qwen3 that answers every chat prompt with `script` and then <|im_end|>.

    Attention and MLP outputs are zeroed, so the last hidden state is the current token's
    embedding: the model is a bigram table. The chat prompt ends in "\\n"; embedding row i of
    the i-th token of "\\n" + script is the basis vector e_i, and the lm_head row of its
    successor is 10·e_i, a logit margin of 10·√32 ≈ 57 that makes sampling deterministic."""
    model = tiny_qwen3(tokenizer, hidden_size=32, num_layers=2, seed=0)
    chain = tokenizer("\n" + script, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.lm_head.weight.zero_()
        for i, (token, successor) in enumerate(zip(chain, chain[1:])):
            model.model.embed_tokens.weight[token, i] = 1.0
            model.lm_head.weight[successor, i] = 10.0
    return model


class TinyPolicy(L.LightningModule):
    """The contract every lit_opd training module gives the callback: student, tokenizer,
    prompt_template, generate_responses; plus a trivial training step."""

    def __init__(self, scripted: bool = True, lr: float = 0.0, fail_generation: bool = False):
        super().__init__()
        self.tokenizer = build_char_tokenizer()
        self.student = scripted_lm(self.tokenizer) if scripted else tiny_qwen3(self.tokenizer, hidden_size=32)
        self.prompt_template = PromptTemplate()
        self.engine = HFGenerateEngine()
        self.lr, self.fail_generation = lr, fail_generation

    def generate_responses(self, prompt_ids, prompt_mask, sampling, generator):
        if self.fail_generation:
            raise RuntimeError("generation broke")
        return self.engine.generate(
            self.student, prompt_ids, prompt_mask, sampling, eos_token_ids(self.tokenizer),
            self.tokenizer.pad_token_id, generator,
        )

    def training_step(self, batch, batch_idx):
        return self.student(input_ids=batch).logits.float().pow(2).mean()

    def validation_step(self, batch, batch_idx):
        """No-op: the callback evaluates."""

    def test_step(self, batch, batch_idx):
        """No-op: the callback evaluates."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def train_data():
    return DataLoader(torch.randint(5, 90, (8, 6), generator=torch.Generator().manual_seed(0)), batch_size=2)


def trainer(root, callback, **kwargs):
    return L.Trainer(
        accelerator="cpu",
        logger=TensorBoardLogger(str(root), name="run", version=0),
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def callback(benchmarks, **kwargs):
    options = dict(n=2, ks=[1, 2], max_new_tokens=8, batch_size=4, progress=False, verify_workers=1)
    return PassAtKEvaluation(benchmarks=benchmarks, **{**options, **kwargs})


@pytest.fixture
def problems_file(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in PROBLEMS), encoding="utf-8")
    return str(path)


def tensorboard_scalars(log_dir) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = {}
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        events = EventAccumulator(str(path), size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            scalars.setdefault(tag, {}).update({e.step: e.value for e in events.Scalars(tag)})
    return scalars


def result(problem_id, correct, lengths, ks=(1, 2)):
    """A ProblemResult with pass@k filled from the hand values below."""
    from lit_opd.metrics import pass_at_k

    return ProblemResult(
        id=problem_id, reference="1", correct=correct,
        pass_at_k={k: pass_at_k(len(correct), sum(correct), k) for k in ks},
        response_lengths=lengths, truncated=sum(length == 10 for length in lengths),
        responses=[""] * len(correct), extracted=[None] * len(correct),
        fallback_answers=sum(length == 2 for length in lengths),
    )


# n = 4; c = 0, 1, 4. pass@1 = c/4 → (0 + 1/4 + 1)/3 = 5/12.
# pass@2 = 1 − C(4−c, 2)/C(4, 2): c=0 → 0, c=1 → 1 − 3/6 = 1/2, c=4 → 1; mean (0 + 1/2 + 1)/3 = 1/2.
# avg@4 = 5 correct / 12 samples; lengths sum (4+10+2+2) + 4·3 + 4·1 = 34 → 34/12; truncated (=10): 1/12;
# fallback answers (=2, a count): 2.
HAND_RESULTS = [
    ("zero", [False] * 4, [4, 10, 2, 2]),
    ("one", [True, False, False, False], [3, 3, 3, 3]),
    ("all", [True] * 4, [1, 1, 1, 1]),
]
HAND_SCORES = {"pass@1": 5 / 12, "pass@2": 1 / 2, "avg@4": 5 / 12, "response_length": 34 / 12, "truncated": 1 / 12,
               "fallback_answers": 2.0}


def test_metric_hand_values():
    metric = PassAtKMetric(ks=[1, 2], n=4)
    metric.update([result(*r) for r in HAND_RESULTS[:2]])
    metric.update([result(*HAND_RESULTS[2])])
    scores = {key: float(value) for key, value in metric.compute().items()}
    assert scores == pytest.approx(HAND_SCORES, abs=1e-12)


def test_answers_from_the_last_number_are_counted():
    from lit_opd.evaluation import _problem_result

    texts = ["it is 12", "\\boxed{12}", "no answer", "12 or \\boxed{13}"]
    problem = Problem(id="p", problem="?", answer="12")
    counted = _problem_result(problem, [1], texts, [3] * 4, [True] * 4, [True, True, False, False], slice(0, 4))
    assert counted.fallback_answers == 1 and counted.to_row()["fallback_answers"] == 1


def test_metric_rejects_results_of_another_shape():
    with pytest.raises(ValueError, match="expects n=4"):
        PassAtKMetric(ks=[1, 2], n=4).update([result("x", [True, False], [1, 1])])


def _reduce_on_rank(rank, world_size, rendezvous, output):
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
    metric = PassAtKMetric(ks=[1, 2], n=4)
    # rank 0 holds problems "zero" and "all", rank 1 holds "one": together the hand example.
    metric.update([result(*HAND_RESULTS[i]) for i in ([0, 2] if rank == 0 else [1])])
    scores = {key: float(value) for key, value in metric.compute().items()}
    torch.save(scores, f"{output}.{rank}")
    dist.destroy_process_group()


def test_metric_reduces_across_two_processes(tmp_path):
    # fork: the children need no re-import of this module (seconds of imports under spawn)
    torch.multiprocessing.start_processes(
        _reduce_on_rank, args=(2, tmp_path / "rendezvous", tmp_path / "scores"), nprocs=2, start_method="fork"
    )
    for rank in range(2):
        assert torch.load(tmp_path / f"scores.{rank}") == pytest.approx(HAND_SCORES, abs=1e-12)


def test_evaluate_counts_and_batches(char_tokenizer):
    model = scripted_lm(char_tokenizer)
    calls = []
    generate = model_generate_fn(model, char_tokenizer)

    def counting_generate(prompt_ids, prompt_mask, sampling, generator):
        calls.append(prompt_ids.shape[0])
        return generate(prompt_ids, prompt_mask, sampling, generator)

    problems = [Problem(**row) for row in PROBLEMS]
    sampling = SamplingConfig(max_new_tokens=8, temperature=0.6, top_p=0.95)
    with Verifier(num_workers=1) as verifier:
        results = evaluate(problems, counting_generate, char_tokenizer, PromptTemplate(), sampling, n=3, ks=[1, 3],
                           generator=torch.Generator().manual_seed(0), verifier=verifier, batch_size=4, progress=False)
    assert calls == [4, 4, 1]  # 3 problems × 3 samples, 4 rows at a time
    assert [r.id for r in results] == ["add", "dec", "eight"]
    assert [r.correct for r in results] == [[True] * 3, [True] * 3, [False] * 3]
    assert [r.pass_at_k for r in results] == [{1: 1.0, 3: 1.0}, {1: 1.0, 3: 1.0}, {1: 0.0, 3: 0.0}]
    assert all(r.responses == [SCRIPT] * 3 and r.extracted == ["7"] * 3 for r in results)
    assert all(r.response_lengths == [4] * 3 and r.truncated == 0 for r in results)  # \boxed{ 7 } <|im_end|>
    with pytest.raises(ValueError, match="every k"):
        evaluate(problems, generate, char_tokenizer, PromptTemplate(), sampling, n=2, ks=[4],
                 generator=torch.Generator(), verifier=verifier)


def test_callback_during_fit_logs_and_writes_jsonl(tmp_path, problems_file):
    """Evaluations at step 0 (at_start), 1 and 2 (every step; fit end is step 2, already done);
    the scripted model's numbers are known: 2 of 3 problems right, every sample alike."""
    evaluation = callback([problems_file, "amc23"], every_n_steps=1, at_start=True, max_problems=3)
    trainer(tmp_path, evaluation, max_steps=2).fit(TinyPolicy(lr=0.0), train_data())
    log_dir = tmp_path / "run" / "version_0"

    assert [entry["step"] for entry in evaluation.history] == [0, 1, 2]
    scalars = tensorboard_scalars(log_dir)
    expected = {
        "eval/mine/pass@1": 2 / 3, "eval/mine/pass@2": 2 / 3, "eval/mine/avg@2": 2 / 3,
        "eval/mine/response_length": 4.0, "eval/mine/truncated": 0.0,
        "eval/amc23/pass@1": 0.0, "eval/amc23/pass@2": 0.0, "eval/amc23/avg@2": 0.0,
        "eval/mean/pass@1": 1 / 3, "eval/mean/pass@2": 1 / 3, "eval/mean/avg@2": 1 / 3,
    }
    for tag, value in expected.items():
        assert scalars[tag] == pytest.approx({0: value, 1: value, 2: value}), tag

    for step in (0, 1, 2):
        rows = [json.loads(line) for line in (log_dir / f"fit_step{step}.jsonl").read_text().splitlines()]
        assert [(r["benchmark"], r["id"]) for r in rows] == [
            ("mine", "add"), ("mine", "dec"), ("mine", "eight"), ("amc23", "amc23-000"), ("amc23", "amc23-001"),
            ("amc23", "amc23-002"),
        ]
        assert [r["correct"] for r in rows[:3]] == [[True, True], [True, True], [False, False]]
        assert rows[0]["responses"] == [SCRIPT, SCRIPT] and rows[0]["extracted"] == ["7", "7"]
        assert all(r["step"] == step and r["stage"] == "fit" and r["n"] == 2 for r in rows)

    markdown_path, png_path = _report(tmp_path, log_dir)
    table = markdown_path.read_text()
    assert "| run | step | amc23 | mine | mean |" in table
    assert "| version_0 | 2 | 0.0000 | 0.6667 | 0.3333 |" in table
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Without the JSONL files the report reads the same numbers from TensorBoard.
    events_only = tmp_path / "events_only"
    events_only.mkdir()
    for path in log_dir.glob("events.out.tfevents.*"):
        shutil.copy(path, events_only)
    from_jsonl, from_events = read_run(log_dir), read_run(events_only)
    for step in (0, 1, 2):
        for key in ("mine/pass@2", "amc23/pass@1", "mean/pass@1", "mean/avg@2"):
            assert from_events[step][key] == pytest.approx(from_jsonl[step][key]), key


def _report(tmp_path, log_dir):
    output = tmp_path / "report"
    report_main([str(log_dir), "--output", str(output)])
    return output / "report.md", output / "pass_at_k.png"


@pytest.mark.parametrize("stage", ["validate", "test"])
def test_callback_in_validate_and_test(tmp_path, problems_file, stage):
    """`lit-opd validate|test` of a plain model: the trainer returns the metrics."""
    evaluation = callback([problems_file], n=4, ks=[1, 4])
    run = getattr(trainer(tmp_path, evaluation), stage)
    (metrics,) = run(TinyPolicy(), DataLoader([0]), verbose=False)
    assert metrics["eval/mine/pass@1"] == pytest.approx(2 / 3)
    assert metrics["eval/mine/pass@4"] == pytest.approx(2 / 3)
    assert metrics["eval/mine/avg@4"] == pytest.approx(2 / 3)
    assert metrics["eval/mean/pass@4"] == pytest.approx(2 / 3)
    rows = (tmp_path / "run" / "version_0" / f"{stage}_step0.jsonl").read_text().splitlines()
    assert [json.loads(row)["num_correct"] for row in rows] == [4, 4, 0]


def test_failed_round_is_a_warning_and_training_goes_on(tmp_path, problems_file, caplog):
    evaluation = callback([problems_file], every_n_steps=1)
    with caplog.at_level(logging.WARNING, logger="lit_opd.callbacks.pass_at_k"):
        fit = trainer(tmp_path, evaluation, max_steps=2)
        fit.fit(TinyPolicy(fail_generation=True), train_data())
    assert fit.global_step == 2
    assert evaluation.history == []
    assert "pass@k evaluation at step 1 failed" in caplog.text
    assert "generation broke" in caplog.text


def test_history_survives_checkpoint_resume(tmp_path, problems_file):
    """Evaluate every 2 steps: step 2 in the first run; resumed to step 3, only the fit end (3)."""
    first = callback([problems_file], every_n_steps=2, at_end=True, output_dir=str(tmp_path / "eval"))
    fit = trainer(tmp_path, first, max_steps=2)
    fit.fit(TinyPolicy(scripted=False, lr=0.1), train_data())
    fit.save_checkpoint(tmp_path / "step2.ckpt")
    assert [entry["step"] for entry in first.history] == [2]

    resumed = callback([problems_file], every_n_steps=2, at_end=True, output_dir=str(tmp_path / "eval"))
    trainer(tmp_path, resumed, max_steps=3).fit(TinyPolicy(scripted=False, lr=0.1), train_data(),
                                                   ckpt_path=tmp_path / "step2.ckpt")
    assert [entry["step"] for entry in resumed.history] == [2, 3]
    assert resumed.history[0]["metrics"] == first.history[0]["metrics"]
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["fit_step2.jsonl", "fit_step3.jsonl"]


def test_callback_arguments_are_checked(problems_file):
    with pytest.raises(ValueError, match="every k in \\[1, n=2\\]"):
        PassAtKEvaluation(benchmarks=[problems_file], n=2, ks=[1, 8])
    with pytest.raises(ValueError, match="distinct"):
        PassAtKEvaluation(benchmarks=["aime24", "aime24"])
    with pytest.raises(ValueError, match="every_n_steps"):
        PassAtKEvaluation(every_n_steps=0)


@pytest.mark.slow
def test_callback_under_ddp_matches_one_process(tmp_path, problems_file):
    """2 CPU processes (gloo): rank 0 evaluates problems 0 and 2, rank 1 problem 1 plus a
    padding copy; the sums over ranks give the one-process numbers and rank 0 writes all rows."""
    evaluation = callback([problems_file, "aime24"], max_problems=3)
    ddp = trainer(tmp_path, evaluation, strategy="ddp_fork", devices=2)
    (metrics,) = ddp.validate(TinyPolicy(), DataLoader([0]), verbose=False)
    assert metrics["eval/mine/pass@1"] == pytest.approx(2 / 3)
    assert metrics["eval/mine/avg@2"] == pytest.approx(2 / 3)
    assert metrics["eval/aime24/pass@2"] == 0.0
    assert metrics["eval/mean/pass@2"] == pytest.approx(1 / 3)
    rows = [json.loads(r) for r in (tmp_path / "run" / "version_0" / "validate_step0.jsonl").read_text().splitlines()]
    assert [(r["benchmark"], r["id"]) for r in rows] == [
        ("mine", "add"), ("mine", "dec"), ("mine", "eight"), ("aime24", "aime24-000"), ("aime24", "aime24-001"),
        ("aime24", "aime24-002"),
    ]
    assert [r["num_correct"] for r in rows] == [2, 2, 0, 0, 0, 0]
