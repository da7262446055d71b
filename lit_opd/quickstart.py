"""The offline quickstart: on-policy distillation end to end on a laptop CPU, no network.

    lit-opd quickstart [--output-dir quickstart_runs] [--seed 0] [--stages data,teacher,student,opd,eval]

Stages (each reads the previous stages' files from the output directory, so any of them can be
rerun alone):
  data     a character-level HF tokenizer (`data/char_tokenizer.py`) and a synthetic verifiable
           task, multi-step integer arithmetic with a \\boxed{} answer: train and held-out JSONL.
  teacher  a tiny Qwen3 trained by SFT (`SFTModule`, a real Lightning Trainer), saved as a HF
           checkpoint.
  student  a Qwen3 of the teacher's shape warm-started briefly (300 SFT steps to the teacher's 600)
           on the same data, saved likewise.
  opd      OPD with the Block64 drift gate, student ← teacher, on the student's own samples:
           Teacher-TopK local support matching (`configs/quickstart/topk_lsm_block64.yaml` through
           `lit_opd.cli`); its TensorBoard holds eval/heldout/pass@<k> at step 0 and at the end.
  opd_sampled, sg_opd
           (not run by default) sampled-token OPD and SG-OPD (phased teacher sampling), both with
           the Block64 gate, from the same warm-started student for the same steps
           (`configs/quickstart/opd_sampled_block64.yaml`, `configs/quickstart/sg_opd.yaml`).
  eval     pass@1 and pass@8 on the held-out problems of the teacher, the student before OPD and
           each distilled student that exists; a table in the terminal and `results.json`.
"""

import argparse
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

import lightning as L
import torch
import yaml
from lightning.pytorch.loggers import TensorBoardLogger
from transformers import AutoModelForCausalLM, AutoTokenizer

from lit_opd.data.benchmarks import load_problems
from lit_opd.data.char_tokenizer import build_char_tokenizer
from lit_opd.data.synthetic import ArithmeticTask, make_splits, write_jsonl
from lit_opd.data.templates import PromptTemplate
from lit_opd.evaluation import evaluate, model_generate_fn
from lit_opd.modules.sft import SFTDataModule, SFTModule
from lit_opd.rollout.engine import SamplingConfig
from lit_opd.tiny import tiny_qwen3
from lit_opd.verify import Verifier

STAGES = ("data", "teacher", "student", "opd", "opd_sampled", "sg_opd", "eval")
DEFAULT_STAGES = ("data", "teacher", "student", "opd", "eval")
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "quickstart"


class DistillStage(NamedTuple):
    """A distillation stage: the config it runs, the HF checkpoint it writes (under models/) and
    the method's name in the results table."""

    config: Path
    output: str
    method: str

    @property
    def label(self) -> str:
        """The distilled student's row in the results table and results.json."""
        return f"student (after {self.method})"


DISTILL_STAGES = {
    "opd": DistillStage(CONFIGS / "topk_lsm_block64.yaml", "student_opd", "OPD"),
    "opd_sampled": DistillStage(CONFIGS / "opd_sampled_block64.yaml", "student_opd_sampled", "sampled-token OPD"),
    "sg_opd": DistillStage(CONFIGS / "sg_opd.yaml", "student_sg_opd", "SG-OPD"),
}

TASK = ArithmeticTask(min_operands=3, max_operands=4, max_operand=9, max_factor=5, max_value=99)
NUM_TRAIN, NUM_HELDOUT = 20_000, 200
# The prompt is the bare problem in the chat template: the task's format is learned by SFT, and
# a short prompt keeps every forward pass on the CPU cheap.
TEMPLATE = PromptTemplate(chat=True, instruction="")
MAX_LENGTH = 128  # prompt + solution + EOS tokens; the longest row is about 100
EVAL_N, EVAL_KS = 8, (1, 8)
EVAL_SAMPLING = SamplingConfig(max_new_tokens=96, temperature=1.0)


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
STUDENT = replace(TEACHER, steps=300, init_seed=2)  # the teacher's shape, less trained


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
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    def model(self, name: str) -> Path:
        """HF checkpoints: "teacher", "student" (warm-started) and each DISTILL_STAGES output."""
        return self.root / "models" / name

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


def build_data(layout: Layout, seed: int) -> None:
    tokenizer = build_char_tokenizer()
    tokenizer.save_pretrained(layout.tokenizer)
    train, heldout = make_splits(TASK, NUM_TRAIN, NUM_HELDOUT, seed=seed)
    write_jsonl(train, layout.train)
    write_jsonl(heldout, layout.heldout)
    print(f"data: {len(train)} train and {len(heldout)} held-out problems in {layout.train.parent}, e.g.")
    print(f"  {heldout[0]['problem']}\n  " + heldout[0]["solution"].replace("\n\n", "\n  "))


def train_sft(layout: Layout, name: str, recipe: SFTRecipe, seed: int) -> None:
    """A fresh tiny Qwen3 of `recipe`'s shape, SFT for recipe.steps, saved to layout.model(name)."""
    tokenizer = AutoTokenizer.from_pretrained(layout.require(layout.tokenizer, "data"))
    layout.require(layout.train, "data")
    init = layout.root / "models" / f"{name}_init"
    model = tiny_qwen3(tokenizer, recipe.hidden_size, recipe.num_layers, recipe.num_heads, recipe.num_kv_heads,
                       seed=recipe.init_seed + 1000 * seed)
    model.save_pretrained(init)
    tokenizer.save_pretrained(init)
    data = SFTDataModule(str(layout.tokenizer), str(layout.train), chat_template=TEMPLATE.chat,
                         instruction=TEMPLATE.instruction, max_length=MAX_LENGTH, batch_size=recipe.batch_size,
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


class SaveStudent(L.Callback):
    """Writes the distilled student as a HF checkpoint at the end of fit, so the next stage (or
    any HF tool) loads it with `from_pretrained`."""

    def __init__(self, path: str):
        self.path = path

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.save_student_pretrained(self.path)


def distill_config(layout: Layout, stage: str, seed: int) -> dict:
    """The stage's config (configs/quickstart/<name>.yaml) with this run's paths and seed filled in."""
    config_path, output, _ = DISTILL_STAGES[stage]
    config = yaml.safe_load(config_path.read_text())
    model, data, trainer = config["model"]["init_args"], config["data"], config["trainer"]
    model["student"] = str(layout.require(layout.model("student"), "student"))
    model["teacher"] = str(layout.require(layout.model("teacher"), "teacher"))
    model["seed"] = seed
    data.update(tokenizer=model["student"], train_data=str(layout.require(layout.train, "data")), seed=seed)
    trainer["logger"]["init_args"]["save_dir"] = str(layout.logs)
    for callback in trainer["callbacks"]:
        if callback["class_path"].endswith("PassAtKEvaluation"):
            callback["init_args"].update(benchmarks=[str(layout.heldout)], seed=seed)
        elif callback["class_path"].endswith("SaveStudent"):
            callback["init_args"]["path"] = str(layout.model(output))
    return config


def run_distillation(layout: Layout, stage: str, seed: int) -> None:
    """`lit-opd fit` on the stage's config, written beside the outputs first
    (`<output-dir>/<name>.yaml`, rerunnable as is); the distilled student is saved as a HF
    checkpoint (`models/<the stage's output>`)."""
    from lit_opd.cli import main as cli_main

    path = layout.root / DISTILL_STAGES[stage].config.name
    path.write_text(yaml.safe_dump(distill_config(layout, stage, seed), sort_keys=False))
    cli_main(["fit", "--config", str(path)])


def evaluate_models(layout: Layout, seed: int) -> dict[str, dict[str, float]]:
    """pass@k on the held-out problems of each model that exists; prints a table."""
    problems = load_problems(str(layout.require(layout.heldout, "data")))
    models = {
        "teacher": layout.model("teacher"),
        "student (before OPD)": layout.model("student"),
        **{stage.label: layout.model(stage.output) for stage in DISTILL_STAGES.values()},
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
                problems, model_generate_fn(model, tokenizer), tokenizer, TEMPLATE, EVAL_SAMPLING, EVAL_N, EVAL_KS,
                torch.Generator().manual_seed(seed), verifier, batch_size=256, progress=False,
            )
            scores = {f"pass@{k}": sum(r.pass_at_k[k] for r in per_problem) / len(per_problem) for k in EVAL_KS}
            scores["seconds"] = time.perf_counter() - started
            results[label] = scores
    print(format_table(results, len(problems)))
    return results


def format_table(results: dict[str, dict[str, float]], num_problems: int) -> str:
    header = f"{'held-out (' + str(num_problems) + ' problems)':<36}" + "".join(f"{f'pass@{k}':>10}" for k in EVAL_KS)
    lines = [header, "-" * len(header)]
    for label, scores in results.items():
        lines.append(f"{label:<36}" + "".join(f"{scores[f'pass@{k}']:>10.3f}" for k in EVAL_KS))
    before = results.get("student (before OPD)")
    for stage in DISTILL_STAGES.values():
        after = results.get(stage.label)
        if before and after:
            gains = "".join(f"{after[f'pass@{k}'] - before[f'pass@{k}']:>+10.3f}" for k in EVAL_KS)
            lines.append(f"{stage.method + ' gain':<36}" + gains)
    return "\n".join(lines)


def parse_stages(text: str) -> list[str]:
    stages = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise argparse.ArgumentTypeError(f"unknown stage(s) {unknown}; choose from {','.join(STAGES)}")
    return [s for s in STAGES if s in stages]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="lit-opd quickstart", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="quickstart_runs", help="where every stage writes (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="data, initialisation and sampling seed")
    parser.add_argument("--stages", type=parse_stages, default=list(DEFAULT_STAGES),
                        help=f"comma-separated subset of {','.join(STAGES)}, run in that order "
                             f"(default: {','.join(DEFAULT_STAGES)})")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    L.seed_everything(args.seed, verbose=False)
    layout = Layout(Path(args.output_dir))
    seconds, results = {}, {}
    for stage in args.stages:
        started = time.perf_counter()
        if stage == "data":
            build_data(layout, args.seed)
        elif stage == "teacher":
            train_sft(layout, "teacher", TEACHER, args.seed)
        elif stage == "student":
            train_sft(layout, "student", STUDENT, args.seed)
        elif stage in DISTILL_STAGES:
            run_distillation(layout, stage, args.seed)
        elif stage == "eval":
            results = evaluate_models(layout, args.seed)
        seconds[stage] = time.perf_counter() - started
        print(f"[quickstart] {stage}: {seconds[stage]:.0f} s")
    summary = {"seconds": seconds, "results": results, "task": asdict(TASK),
               "teacher": asdict(TEACHER), "student": asdict(STUDENT)}
    if results:
        layout.results.write_text(json.dumps(summary, indent=2))
    print(f"[quickstart] total {sum(seconds.values()):.0f} s; outputs in {layout.root}")
    return summary


if __name__ == "__main__":
    main()
