"""The offline quickstart: on-policy distillation end to end on a laptop CPU, no network.

    lit-opd quickstart [--output-dir quickstart_runs] [--seed 0] [--task arithmetic|granular]
                       [--stages data,teacher,student,opd,eval]

Stages (each reads the previous stages' files from the output directory, so any of them can be
rerun alone):
  data     a character-level HF tokenizer (`data/char_tokenizer.py`) and a synthetic verifiable
           task, multi-step integer arithmetic with a \\boxed{} answer: train and held-out JSONL,
           and a larger evaluation set (the held-out problems and more from a stream of their own,
           none of them a train problem) for the sweeps that must resolve small differences.
  teacher  a tiny Qwen3 trained by SFT (`SFTModule`, a real Lightning Trainer), saved as a HF
           checkpoint.
  student  a Qwen3 of the teacher's shape warm-started briefly (300 SFT steps to the teacher's 600)
           on the same data, saved likewise.
  opd      OPD with the Block64 drift gate, student ← teacher, on the student's own samples:
           Teacher-TopK local support matching (`lit-opd fit` on configs/quickstart/base.yaml and
           topk_lsm_block64.yaml, run in the output directory); its TensorBoard holds
           eval/heldout/pass@<k> at step 0 and at the end.
  opd_sampled, sg_opd
           (not run by default) sampled-token OPD and SG-OPD (phased teacher sampling), both with
           the Block64 gate, from the same warm-started student for the same steps
           (configs/quickstart/opd_sampled_block64.yaml, configs/quickstart/sg_opd.yaml).
  eval     pass@1 and pass@8 on the held-out problems of the teacher, the student before OPD and
           each distilled student that exists; a table in the terminal and `results.json`.
What the stages run (task, model shapes, SFT steps, evaluation) is a `QuickstartSettings`.
"""

import argparse
import json
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from transformers import AutoModelForCausalLM, AutoTokenizer

from lit_opd.data.benchmarks import load_problems
from lit_opd.data.char_tokenizer import build_char_tokenizer
from lit_opd.data.synthetic import ArithmeticTask, extra_heldout, make_splits, write_jsonl
from lit_opd.data.templates import PromptTemplate
from lit_opd.evaluation import evaluate, model_generate_fn
from lit_opd.lightning_cli import fit_run
from lit_opd.modules.sft import SFTDataModule, SFTModule
from lit_opd.rollout.engine import SamplingConfig
from lit_opd.tiny import tiny_qwen3
from lit_opd.verify import Verifier

STAGES = ("data", "teacher", "student", "opd", "opd_sampled", "sg_opd", "eval")
DEFAULT_STAGES = ("data", "teacher", "student", "opd", "eval")


class DistillStage(NamedTuple):
    """A distillation stage: its config over quickstart/base (a shipped config's name, also its
    run's name under logs/) and the method's name in the results table."""

    config: str
    method: str

    @property
    def label(self) -> str:
        """The distilled student's row in the results table and results.json."""
        return f"student (after {self.method})"


DISTILL_STAGES = {
    "opd": DistillStage("topk_lsm_block64", "OPD"),
    "opd_sampled": DistillStage("opd_sampled_block64", "sampled-token OPD"),
    "sg_opd": DistillStage("sg_opd", "SG-OPD"),
}


@dataclass(frozen=True)
class SFTRecipe:
    """A tiny Qwen3 shape and the SFT run that trains it from random weights."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    init_seed: int


TEACHER = SFTRecipe(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, steps=600, batch_size=32,
                    lr=3e-3, warmup_steps=30, init_seed=1)


@dataclass(frozen=True)
class QuickstartSettings:
    """What the stages run. task: the synthetic task (num_train / num_heldout problems;
    num_heldout_eval: the larger evaluation file's problems, the held-out ones first, at least
    num_heldout; adding to it leaves the train and held-out files as they are);
    template: the prompt (the bare problem in the chat template: the task's format is learned
    by SFT, and a short prompt keeps every forward pass on the CPU cheap); max_length: SFT rows'
    prompt + solution + EOS tokens (the longest is about 100); teacher / student: SFT recipes
    (the student has the teacher's shape, less trained); eval_n, eval_ks, eval_sampling: the
    eval stage's pass@k; fit_configs, fit_args: more config files (shipped names or paths) and
    `lit-opd fit` arguments for every distillation stage, after its own configs."""

    task: ArithmeticTask = ArithmeticTask(min_operands=3, max_operands=4, max_operand=9, max_factor=5, max_value=99)
    num_train: int = 20_000
    num_heldout: int = 200
    num_heldout_eval: int = 400
    template: PromptTemplate = PromptTemplate(chat=True, instruction="")
    max_length: int = 128
    teacher: SFTRecipe = TEACHER
    student: SFTRecipe = replace(TEACHER, steps=300, init_seed=2)
    eval_n: int = 8
    eval_ks: tuple[int, ...] = (1, 8)
    eval_sampling: SamplingConfig = SamplingConfig(max_new_tokens=96, temperature=1.0)
    fit_args: tuple[str, ...] = field(default_factory=tuple)
    fit_configs: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.num_heldout_eval < self.num_heldout:
            raise ValueError(f"num_heldout_eval ({self.num_heldout_eval}) must be ≥ num_heldout ({self.num_heldout})")


TASKS = {
    "arithmetic": QuickstartSettings(),
    # Worked solutions of 123-203 character tokens (median 155) in 3-4 worded steps: a task where
    # a 16-token block, a step (span), a token and the whole response are different units
    # (configs/sweeps/cpu_grid.yaml runs the papers' comparison grid on it).
    "granular": QuickstartSettings(
        task=ArithmeticTask(min_operands=4, max_operands=5, max_operand=9, max_factor=5, max_value=99,
                            worded_steps=True),
        max_length=288,
        teacher=replace(TEACHER, steps=800),
        student=replace(TEACHER, steps=400, init_seed=2),
        eval_sampling=SamplingConfig(max_new_tokens=224, temperature=1.0),
        fit_configs=("sweeps/cpu_task",),
    ),
}


@dataclass(frozen=True)
class Layout:
    """Where each stage writes, under the output directory."""

    root: Path

    @property
    def train(self) -> Path:
        return self.root / "data" / "train.jsonl"

    @property
    def heldout(self) -> Path:
        return self.root / "data" / "heldout.jsonl"

    @property
    def heldout_eval(self) -> Path:
        """The held-out problems, then more drawn apart from the train split (configs/sweeps/cpu_evidence)."""
        return self.root / "data" / "heldout_eval.jsonl"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    def model(self, name: str) -> Path:
        """HF checkpoints of the SFT stages: "teacher" and "student" (warm-started)."""
        return self.root / "models" / name

    def distilled(self, stage: DistillStage) -> Path:
        """The student a distillation stage exports (ExportStudent under its log directory)."""
        return self.logs / stage.config / "student" / "final"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def results(self) -> Path:
        return self.root / "results.json"

    def require(self, path: Path, stage: str) -> Path:
        if not path.exists():
            raise SystemExit(f"{path} does not exist: run the {stage!r} stage first (--stages {stage},...)")
        return path


def build_data(layout: Layout, settings: QuickstartSettings, seed: int) -> None:
    tokenizer = build_char_tokenizer()
    tokenizer.save_pretrained(layout.tokenizer)
    train, heldout = make_splits(settings.task, settings.num_train, settings.num_heldout, seed=seed)
    write_jsonl(train, layout.train)
    write_jsonl(heldout, layout.heldout)
    extra = extra_heldout(settings.task, train, heldout, settings.num_heldout_eval - len(heldout), seed=seed)
    write_jsonl(heldout + extra, layout.heldout_eval)
    print(f"data: {len(train)} train and {len(heldout)} held-out problems ({len(heldout) + len(extra)} in "
          f"{layout.heldout_eval.name}) in {layout.train.parent}, e.g.")
    print(f"  {heldout[0]['problem']}\n  " + heldout[0]["solution"].replace("\n\n", "\n  "))


def train_sft(layout: Layout, name: str, recipe: SFTRecipe, template: PromptTemplate, max_length: int,
              seed: int) -> None:
    """A fresh tiny Qwen3 of `recipe`'s shape, SFT for recipe.steps, saved to layout.model(name)."""
    tokenizer = AutoTokenizer.from_pretrained(layout.require(layout.tokenizer, "data"))
    layout.require(layout.train, "data")
    init = layout.root / "models" / f"{name}_init"
    model = tiny_qwen3(tokenizer, recipe.hidden_size, recipe.num_layers, recipe.num_heads, recipe.num_kv_heads,
                       seed=recipe.init_seed + 1000 * seed)
    model.save_pretrained(init)
    tokenizer.save_pretrained(init)
    data = SFTDataModule(str(layout.tokenizer), str(layout.train), chat_template=template.chat,
                         instruction=template.instruction, max_length=max_length, batch_size=recipe.batch_size,
                         seed=seed)
    module = SFTModule(str(init), str(layout.tokenizer), lr=recipe.lr, warmup_steps=recipe.warmup_steps)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=recipe.steps,
        gradient_clip_val=1.0,
        logger=TensorBoardLogger(layout.logs, name=f"sft_{name}", version=""),
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    module.save_pretrained(layout.model(name))
    print(f"{name}: {sum(p.numel() for p in module.model.parameters()):,} parameters, {recipe.steps} SFT steps, "
          f"final train/loss {trainer.callback_metrics['train/loss'].item():.3f} → {layout.model(name)}")


@contextmanager
def working_directory(path: Path):
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def run_distillation(layout: Layout, stage: DistillStage, settings: QuickstartSettings, seed: int) -> None:
    """`lit-opd fit --config quickstart/base --config quickstart/<stage> [--config <fit_configs>]
    --model.init_args.seed <seed> --data.seed <seed>` in the output directory (the configs' paths
    are relative to it)."""
    layout.require(layout.model("student"), "student")
    layout.require(layout.model("teacher"), "teacher")
    layout.require(layout.train, "data")
    with working_directory(layout.root):
        fit_run(["quickstart/base", f"quickstart/{stage.config}", *settings.fit_configs],
                [f"--model.init_args.seed={seed}", f"--data.seed={seed}", *settings.fit_args])


def evaluate_models(layout: Layout, settings: QuickstartSettings, seed: int) -> dict[str, dict[str, float]]:
    """pass@k on the held-out problems of each model that exists; prints a table."""
    problems = load_problems(str(layout.require(layout.heldout, "data")))
    models = {
        "teacher": layout.model("teacher"),
        "student (before OPD)": layout.model("student"),
        **{stage.label: layout.distilled(stage) for stage in DISTILL_STAGES.values()},
    }
    results = {}
    with Verifier(timeout=5.0) as verifier:
        for label, path in models.items():
            if not path.exists():
                continue
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path).eval()
            started = time.perf_counter()
            per_problem = evaluate(
                problems, model_generate_fn(model, tokenizer), tokenizer, settings.template, settings.eval_sampling,
                settings.eval_n, settings.eval_ks,
                torch.Generator().manual_seed(seed), verifier, batch_size=256, progress=False,
            )
            scores = {f"pass@{k}": sum(r.pass_at_k[k] for r in per_problem) / len(per_problem) for k in settings.eval_ks}
            scores["seconds"] = time.perf_counter() - started
            results[label] = scores
    print(format_table(results, len(problems), settings.eval_ks))
    return results


def format_table(results: dict[str, dict[str, float]], num_problems: int, ks: tuple[int, ...]) -> str:
    header = f"{'held-out (' + str(num_problems) + ' problems)':<36}" + "".join(f"{f'pass@{k}':>10}" for k in ks)
    lines = [header, "-" * len(header)]
    for label, scores in results.items():
        lines.append(f"{label:<36}" + "".join(f"{scores[f'pass@{k}']:>10.3f}" for k in ks))
    before = results.get("student (before OPD)")
    for stage in DISTILL_STAGES.values():
        after = results.get(stage.label)
        if before and after:
            gains = "".join(f"{after[f'pass@{k}'] - before[f'pass@{k}']:>+10.3f}" for k in ks)
            lines.append(f"{stage.method + ' gain':<36}" + gains)
    return "\n".join(lines)


def parse_stages(text: str) -> list[str]:
    stages = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise argparse.ArgumentTypeError(f"unknown stage(s) {unknown}; choose from {','.join(STAGES)}")
    return [s for s in STAGES if s in stages]


def run(output_dir: str | Path, stages: list[str], seed: int = 0,
        settings: QuickstartSettings = QuickstartSettings()) -> dict:
    """Run `stages` (in STAGES order) into `output_dir`; the summary also written to results.json
    when the eval stage ran."""
    L.seed_everything(seed, verbose=False)
    layout = Layout(Path(output_dir).resolve())
    seconds, results = {}, {}
    for stage in stages:
        started = time.perf_counter()
        if stage == "data":
            build_data(layout, settings, seed)
        elif stage in ("teacher", "student"):
            recipe = settings.teacher if stage == "teacher" else settings.student
            train_sft(layout, stage, recipe, settings.template, settings.max_length, seed)
        elif stage in DISTILL_STAGES:
            run_distillation(layout, DISTILL_STAGES[stage], settings, seed)
        elif stage == "eval":
            results = evaluate_models(layout, settings, seed)
        seconds[stage] = time.perf_counter() - started
        print(f"[quickstart] {stage}: {seconds[stage]:.0f} s")
    summary = {"seconds": seconds, "results": results, "task": asdict(settings.task),
               "teacher": asdict(settings.teacher), "student": asdict(settings.student)}
    if results:
        layout.results.write_text(json.dumps(summary, indent=2))
    print(f"[quickstart] total {sum(seconds.values()):.0f} s; outputs in {layout.root}")
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="lit-opd quickstart", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="quickstart_runs", help="where every stage writes (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="data, initialisation and sampling seed")
    parser.add_argument("--stages", type=parse_stages, default=list(DEFAULT_STAGES),
                        help=f"comma-separated subset of {','.join(STAGES)}, run in that order "
                             f"(default: {','.join(DEFAULT_STAGES)})")
    parser.add_argument("--task", choices=sorted(TASKS), default="arithmetic",
                        help="arithmetic: 2-3 bare equations (~35 tokens); granular: 3-4 worded steps "
                             "(~155 tokens), the task of configs/sweeps/cpu_grid.yaml (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    return run(args.output_dir, args.stages, args.seed, TASKS[args.task])
