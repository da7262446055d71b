"""The prompt DataModule: problems → chat-templated token ids → a schedule of rollout micro-steps.

Each rollout batch of `prompts_per_rollout` prompts (per rank) is used for `reuse` epochs over
`num_minibatches` mini-batches, so the train loader yields `reuse · num_minibatches` items per
rollout batch, each naming which mini-batch of which rollout the training step works on. The
module generates the rollouts when an item opens a new rollout batch.
"""

from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, IterableDataset
from transformers import AutoTokenizer

from lit_opd.data.records import field, load_records
from lit_opd.data.templates import MATH_INSTRUCTION, PromptTemplate, dapo_problem
from lit_opd.setting_checks import check_range


def left_pad(sequences: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists → (ids [B, P] long, mask [B, P] bool), padded on the left."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = True
    return ids, mask


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class RolloutSchedule(IterableDataset):
    """Yields one item per training micro-step, as a pure function of the micro-step counter k:
    rollout r = k // R, its mini-batch (k % R) % num_minibatches, R = reuse · num_minibatches.

    Prompts are drawn without replacement from a permutation seeded by (seed, epoch); rank i of
    w takes the i-th of w equal slices of each global rollout batch. `start` is the next micro-step
    to yield: it advances as items are read, and the DataModule sets it from the trainer's progress
    (on resume, the restored one).
    """

    def __init__(self, prompts, answers, prompts_per_rollout, reuse, num_minibatches, shuffle, seed, pad_token_id):
        self.prompts, self.answers = prompts, answers
        self.prompts_per_rollout, self.reuse, self.num_minibatches = prompts_per_rollout, reuse, num_minibatches
        self.shuffle, self.seed, self.pad_token_id = shuffle, seed, pad_token_id
        self.start = 0

    @property
    def steps_per_rollout(self) -> int:
        return self.reuse * self.num_minibatches

    def rollouts_per_epoch(self, world: int) -> int:
        return len(self.prompts) // (self.prompts_per_rollout * world)

    def __len__(self) -> int:
        return self.rollouts_per_epoch(_world()[1]) * self.steps_per_rollout

    def _order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(len(self.prompts))
        return torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))

    def item(self, k: int, rank: int, world: int) -> dict:
        rollouts = self.rollouts_per_epoch(world)
        rollout, micro = divmod(k, self.steps_per_rollout)
        epoch, within = divmod(rollout, rollouts)
        global_batch = self.prompts_per_rollout * world
        start = within * global_batch + rank * self.prompts_per_rollout
        indices = self._order(epoch)[start : start + self.prompts_per_rollout].tolist()
        prompt_ids, prompt_mask = left_pad([self.prompts[i] for i in indices], self.pad_token_id)
        return {
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "prompt_index": torch.tensor(indices),
            "answers": [self.answers[i] for i in indices],
            "rollout_index": rollout,
            "minibatch_index": micro % self.num_minibatches,
            "reuse_index": micro // self.num_minibatches,
            "num_minibatches": self.num_minibatches,
        }

    def __iter__(self):
        rank, world = _world()
        end = (self.start // len(self) + 1) * len(self) if len(self) else 0
        for k in range(self.start, end):
            # Advanced before the yield: Lightning stops reading after len(self) items and never
            # exhausts this generator, so the next epoch's iterator must find its start here.
            self.start = k + 1
            yield self.item(k, rank, world)


class ScheduleLoader(DataLoader):
    """The train DataLoader over a RolloutSchedule. It keeps no state of its own: on resume the
    schedule starts from the trainer's restored batch progress (`PromptDataModule.micro_steps_done`).
    Its state_dict / load_state_dict tell Lightning that it resumes mid-epoch."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore: see the class docstring."""


class PromptDataModule(L.LightningDataModule):
    """Math prompts for on-policy distillation.

    Args:
        tokenizer: path or hub id of the (student's) tokenizer; set once, linked to the model.
        train_data: a .jsonl / .json / .parquet file or an HF dataset id.
        prompt_field / answer_field: the row fields (dotted names reach nested fields, e.g.
            "reward_model.ground_truth"; a list of chat messages gives its last user turn).
        problem_format: "as_is": the prompt field is the problem; "dapo": it is DAPO-Math-17k's
            "Answer: $Answer" prompt, whose problem is taken out (a row that is not one is an
            error naming its line) so that it gets `instruction`, the \\boxed{} instruction the
            evaluation uses: the verifier's verdicts in training and the scores mean the same.
        chat_template: render prompts with the tokenizer's chat template (False: a plain template).
        instruction: appended to each problem ("" for none, e.g. when the rows carry their own).
        enable_thinking: passed to the chat template (Qwen3: whether the response opens with a
            thinking block; None: the template's default); evaluation uses the same.
        Rows repeating an earlier row's problem are dropped before tokenising, and counted
        (DAPO-Math-17k on the hub holds each of its ~17.9k prompts about 100 times).
        max_prompt_length: longer prompts are dropped and counted (a warning says how many).
        prompts_per_rollout: prompts per rollout batch on each rank (× num_samples responses).
        reuse: optimiser epochs over each rollout batch; num_minibatches: mini-batches per epoch.
    """

    def __init__(
        self,
        tokenizer: str,
        train_data: str | None = None,
        split: str = "train",
        prompt_field: str = "problem",
        answer_field: str = "answer",
        problem_format: Literal["as_is", "dapo"] = "as_is",
        chat_template: bool = True,
        instruction: str = MATH_INSTRUCTION,
        enable_thinking: bool | None = None,
        max_prompt_length: int = 512,
        max_prompts: int | None = None,
        prompts_per_rollout: int = 32,
        reuse: int = 2,
        num_minibatches: int = 1,
        shuffle: bool = True,
        seed: int = 0,
    ):
        super().__init__()
        for name, value in (("prompts_per_rollout", prompts_per_rollout), ("reuse", reuse),
                            ("num_minibatches", num_minibatches), ("max_prompt_length", max_prompt_length)):
            check_range(f"data.{name}", value, 1)
        check_range("data.max_prompts", max_prompts, 1, optional=True)
        check_range("data.seed", seed, 0)
        self.save_hyperparameters()
        self.template = PromptTemplate(chat=chat_template, instruction=instruction, enable_thinking=enable_thinking)
        self.schedule: RolloutSchedule | None = None
        self.num_filtered = self.num_duplicates = 0

    def setup(self, stage: str) -> None:
        if stage != "fit" or self.schedule is not None:
            return
        hp = self.hparams
        if hp.train_data is None:
            raise ValueError("data.train_data is required for fit (a .jsonl/.json/.parquet file or an HF dataset id)")
        tokenizer = AutoTokenizer.from_pretrained(hp.tokenizer)
        rows = load_records(hp.train_data, hp.split)
        problems = self.unique_problems(rows)
        if hp.max_prompts is not None:
            problems = problems[: hp.max_prompts]
        prompts, answers = [], []
        for problem, answer in problems:
            ids = tokenizer(self.template.render(tokenizer, problem), add_special_tokens=False)["input_ids"]
            if len(ids) > hp.max_prompt_length:
                self.num_filtered += 1
                continue
            prompts.append(ids)
            answers.append(answer)
        if self.num_filtered:
            rank_zero_warn(
                f"{hp.train_data}: dropped {self.num_filtered} of {len(problems)} prompts longer than "
                f"data.max_prompt_length={hp.max_prompt_length} tokens"
            )
        _, world = _world()
        if len(prompts) < hp.prompts_per_rollout * world:
            raise ValueError(
                f"{hp.train_data}: {len(prompts)} usable prompts, fewer than one rollout batch "
                f"(data.prompts_per_rollout={hp.prompts_per_rollout} × {world} ranks)"
            )
        self.schedule = RolloutSchedule(
            prompts, answers, hp.prompts_per_rollout, hp.reuse, hp.num_minibatches, hp.shuffle, hp.seed,
            tokenizer.pad_token_id,
        )

    def unique_problems(self, rows: list[dict]) -> list[tuple[str, str]]:
        """(problem, answer) of each row whose problem no earlier row had, in `problem_format`;
        the duplicates are counted (`num_duplicates`) and logged."""
        hp, seen, problems = self.hparams, set(), []
        for row in rows:
            text = field(row, hp.prompt_field, hp.train_data)
            problem = text if hp.problem_format == "as_is" else dapo_problem(text)
            if problem is None:
                raise ValueError(f"{hp.train_data}:{row.get('_line', '?')}: field {hp.prompt_field!r} is not a "
                                 f"DAPO-Math prompt (data.problem_format=dapo): {text[:80]!r}")
            if problem not in seen:
                seen.add(problem)
                problems.append((problem, field(row, hp.answer_field, hp.train_data)))
        self.num_duplicates = len(rows) - len(problems)
        if self.num_duplicates:
            rank_zero_info(f"{hp.train_data}: {len(problems)} distinct problems; dropped {self.num_duplicates} "
                           f"rows that repeat one")
        return problems

    def train_dataloader(self) -> DataLoader:
        self.schedule.start = self.micro_steps_done()
        return ScheduleLoader(self.schedule, batch_size=None, num_workers=0)

    def micro_steps_done(self) -> int:
        """Training micro-steps the trainer has run, restored from the checkpoint on resume: the
        schedule continues from there. (Not counted from the DataLoader, which Lightning reads one
        item ahead; a checkpoint saved in on_train_batch_end counts its own step as processed.)"""
        if self.trainer is None:
            return 0
        return self.trainer.fit_loop.epoch_loop.batch_progress.total.processed

    def val_dataloader(self) -> DataLoader:
        """One placeholder item: `validate`/`test` run the PassAtKEvaluation callback, which
        brings its own benchmark problems."""
        return DataLoader([0], batch_size=None)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def state_dict(self) -> dict:
        return {"num_filtered": self.num_filtered}

    def load_state_dict(self, state: dict) -> None:
        self.num_filtered = state.get("num_filtered", 0)

