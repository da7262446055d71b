"""pass@k / avg@n of the student on math benchmarks, during fit and in `validate` / `test`."""

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.trainer.states import TrainerFn

from lit_opd.data.benchmarks import BENCHMARKS, Problem, benchmark_name, load_problems
from lit_opd.data.templates import MATH_INSTRUCTION, PromptTemplate
from lit_opd.evaluation import PassAtKMetric, ProblemResult, evaluate
from lit_opd.rollout.engine import SamplingConfig
from lit_opd.setting_checks import check_range
from lit_opd.verify import DEFAULT_TIMEOUT, Verifier, available_cpus

log = logging.getLogger(__name__)


class PassAtKEvaluation(L.Callback):
    """Samples n responses per benchmark problem, verifies them, logs per benchmark
    `eval/<set>/pass@<k>`, `eval/<set>/avg@<n>`, `eval/<set>/response_length` (tokens),
    `eval/<set>/truncated` (fraction without an end token), `eval/<set>/fallback_answers` (how
    many answers were the last number, for want of a \\boxed{}), and `eval/mean/pass@<k>`,
    `eval/mean/avg@<n>` (the unweighted mean over the sets); writes every problem's responses,
    answers and verdicts to `<output_dir>/<fit|validate|test>_step<step>.jsonl`.

    When: at fit start (if at_start), each time global_step passes a multiple of every_n_steps,
    at the end of fit (if at_end), and in `validate` / `test` (the module's validation_step and
    test_step are no-ops; this callback evaluates at the epoch end).

    The module provides `tokenizer`, `prompt_template` (its `chat` is used unless `chat` is set
    here) and `generate_responses(prompt_ids, prompt_mask, sampling, generator)`. Each rank
    evaluates problems[rank::world_size], padded to the same count so every rank makes the same
    generate calls (FSDP needs that); the metrics are summed over ranks. In fit, a round that
    fails on any rank is skipped with a warning, and training goes on; in validate / test, whose
    whole work it is, it is an error (the command exits non-zero in one line).

    Args:
        benchmarks: packaged names (aime24, aime25, math500, amc23), .jsonl/.json/.parquet
            paths, or HF dataset ids.
        n, ks: samples per problem and the k of pass@k (each ≤ n).
        temperature, top_p, max_new_tokens: sampling (the papers' pass@8: 0.6, 0.95).
        max_problems: evaluate only the first problems of each benchmark (quick runs).
        batch_size: responses generated per call.
        chat: chat template (True) or plain "Solution:" template (False); None: the module's
            (its DataModule's; the chat template's enable_thinking is always the DataModule's).
        instruction: appended to each problem; the benchmarks carry none.
        verify_timeout: seconds per answer check; verify_workers: verifier processes per rank
            (None: this machine's CPUs divided by the devices on it).
        output_dir: where the JSONL files go (None: the trainer's log_dir).
        save_responses: keep the response texts in the JSONL (else answers and verdicts only).
        seed: sampling seed (rank r uses seed·1000003 + r; every round restarts it, so rounds
            differ by the weights only); None: the module's `seed` (0 for a module without one).
    """

    def __init__(
        self,
        benchmarks: Sequence[str] = tuple(BENCHMARKS),
        n: int = 8,
        ks: Sequence[int] = (1, 8),
        temperature: float = 0.6,
        top_p: float = 0.95,
        max_new_tokens: int = 4096,
        every_n_steps: int | None = None,
        at_start: bool = False,
        at_end: bool = True,
        max_problems: int | None = None,
        batch_size: int = 64,
        chat: bool | None = None,
        instruction: str = MATH_INSTRUCTION,
        verify_timeout: float = DEFAULT_TIMEOUT,
        verify_workers: int | None = None,
        output_dir: str | None = None,
        save_responses: bool = True,
        seed: int | None = None,
        progress: bool = True,
    ):
        names = [benchmark_name(source) for source in benchmarks]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"benchmarks must be a non-empty list of distinct sets, got {list(benchmarks)}")
        if not ks or any(not 1 <= k <= n for k in ks):
            raise ValueError(f"ks must be non-empty with every k in [1, n={n}], got {list(ks)}")
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be ≥ 1 or None, got {every_n_steps}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        key = "PassAtKEvaluation"
        check_range(f"{key}.temperature", temperature, 0)
        check_range(f"{key}.top_p", top_p, 0, 1, low_open=True)
        check_range(f"{key}.max_new_tokens", max_new_tokens, 1)
        check_range(f"{key}.max_problems", max_problems, 1, optional=True)
        check_range(f"{key}.verify_timeout", verify_timeout, 0, low_open=True)
        check_range(f"{key}.verify_workers", verify_workers, 1, optional=True)
        self.benchmarks, self.n, self.ks = list(benchmarks), n, sorted(set(ks))
        self.sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
        self.every_n_steps, self.at_start, self.at_end = every_n_steps, at_start, at_end
        self.max_problems, self.batch_size = max_problems, batch_size
        self.chat, self.instruction = chat, instruction
        self.verify_timeout, self.verify_workers = verify_timeout, verify_workers
        self.output_dir, self.save_responses, self.seed, self.progress = output_dir, save_responses, seed, progress
        self.problems: dict[str, list[Problem]] = {}
        self.verifier: Verifier | None = None
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------------ hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.problems:
            self.problems = {
                benchmark_name(source): load_problems(source, max_problems=self.max_problems)
                for source in self.benchmarks
            }
        if self.verifier is None:
            workers = self.verify_workers or max(1, available_cpus() // max(1, trainer.num_devices))
            self.verifier = Verifier(num_workers=workers, timeout=self.verify_timeout)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.verifier is not None:
            self.verifier.close()

    def on_train_start(self, trainer, pl_module) -> None:
        if self.at_start and not self._evaluated(trainer.global_step):
            self.run(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps is None or step == 0 or self._evaluated(step):
            return
        last = max((e["step"] for e in self.history if e["stage"] == TrainerFn.FITTING.value), default=0)
        if step // self.every_n_steps > last // self.every_n_steps:
            self.run(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_end and not self._evaluated(trainer.global_step):
            self.run(trainer, pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING and not trainer.sanity_checking:
            self.run(trainer, pl_module)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == TrainerFn.TESTING:
            self.run(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict["history"])

    # ------------------------------------------------------------------------ evaluation
    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float] | None:
        """One evaluation round at the current global step on every rank: the metrics logged,
        or None if the round failed on some rank."""
        step, stage = trainer.global_step, trainer.state.fn.value
        started = time.perf_counter()
        results, failure = {}, None
        try:
            results = self._evaluate_shards(trainer, pl_module)
        except Exception as error:
            log.exception("rank %d: pass@k evaluation at step %d failed", trainer.global_rank, step)
            failure = error
        if trainer.strategy.reduce_boolean_decision(failure is not None, all=False):
            if stage != TrainerFn.FITTING.value:  # the evaluation is all validate / test do: it failed
                reason = " ".join(str(failure).split()) if failure is not None else "it failed on another rank"
                raise ValueError(f"{stage}: the pass@k evaluation failed, no metrics were written: {reason}") from failure
            if trainer.is_global_zero:
                log.warning("pass@k evaluation at step %d failed (see the error above); going on without it", step)
            return None
        metrics = self._reduce(results, pl_module.device)
        metrics["eval/seconds"] = time.perf_counter() - started
        self._write_jsonl(trainer, step, stage, results)
        self._log(trainer, pl_module, metrics, step, stage)
        self.history.append({"step": step, "stage": stage, "metrics": metrics})
        return metrics

    def _evaluate_shards(self, trainer, pl_module) -> dict[str, list[tuple[int, ProblemResult]]]:
        """{set: [(problem index, result)]} for this rank's shard of every benchmark."""
        rank, world = trainer.global_rank, trainer.world_size
        trained = pl_module.prompt_template
        template = PromptTemplate(chat=trained.chat if self.chat is None else self.chat, instruction=self.instruction,
                                  enable_thinking=trained.enable_thinking)
        seed = getattr(pl_module, "seed", 0) if self.seed is None else self.seed
        generator = torch.Generator().manual_seed(seed * 1_000_003 + rank)
        shards = {}
        for name, problems in self.problems.items():
            indices = list(range(rank, len(problems), world))
            padding = [problems[0]] * (math.ceil(len(problems) / world) - len(indices))
            results = evaluate(
                [problems[i] for i in indices] + padding,
                pl_module.generate_responses,
                pl_module.tokenizer,
                template,
                self.sampling,
                self.n,
                self.ks,
                generator,
                self.verifier,
                batch_size=self.batch_size,
                device=pl_module.device,
                progress=self.progress and trainer.is_global_zero,
                description=f"pass@k {name}",
            )
            shards[name] = list(zip(indices, results))
        return shards

    def _reduce(self, results: dict[str, list[tuple[int, ProblemResult]]], device: torch.device) -> dict[str, float]:
        """Metric compute per set (a collective: every rank calls it for every set, in order)."""
        metrics = {}
        for name, indexed in results.items():
            metric = PassAtKMetric(self.ks, self.n).to(device)
            metric.update([result for _, result in indexed])
            metrics.update({f"eval/{name}/{key}": float(value) for key, value in metric.compute().items()})
        for key in [f"pass@{k}" for k in self.ks] + [f"avg@{self.n}"]:
            metrics[f"eval/mean/{key}"] = sum(metrics[f"eval/{name}/{key}"] for name in results) / len(results)
        return metrics

    def _write_jsonl(self, trainer, step: int, stage: str, results) -> None:
        """Every problem of every set, gathered on rank 0, in the benchmark's order."""
        rows = [
            {"step": step, "stage": stage, "benchmark": name, "index": index, **result.to_row(self.save_responses)}
            for name, indexed in results.items()
            for index, result in indexed
        ]
        gathered = _gather_on_rank_zero(rows, trainer)
        directory = Path(self.output_dir or trainer.log_dir)  # log_dir is a broadcast: all ranks call it
        if not trainer.is_global_zero:
            return
        order = {name: i for i, name in enumerate(results)}
        gathered.sort(key=lambda row: (order[row["benchmark"]], row["index"]))
        directory.mkdir(parents=True, exist_ok=True)
        with (directory / f"{stage}_step{step}.jsonl").open("w", encoding="utf-8") as handle:
            for row in gathered:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")

    def _log(self, trainer, pl_module, metrics: dict[str, float], step: int, stage: str) -> None:
        if stage == TrainerFn.FITTING.value:
            # self.log is not allowed in on_train_start/on_train_end: write to the loggers at
            # this exact step, and expose the values to ModelCheckpoint(monitor=...) too.
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
            trainer.callback_metrics.update({key: torch.tensor(value) for key, value in metrics.items()})
        else:
            # validate / test: through self.log, so the trainer prints and returns them.
            pl_module.log_dict(metrics, sync_dist=True)

    def _evaluated(self, step: int) -> bool:
        return any(entry["step"] == step and entry["stage"] == TrainerFn.FITTING.value for entry in self.history)


def _gather_on_rank_zero(rows: list[dict], trainer: L.Trainer) -> list[dict]:
    """All ranks' rows on rank 0 (others get []); a collective when there are several ranks."""
    if trainer.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return rows
    gathered = [None] * trainer.world_size if trainer.is_global_zero else None
    dist.gather_object(rows, gathered, dst=0)
    return [row for part in gathered for row in part] if trainer.is_global_zero else []
