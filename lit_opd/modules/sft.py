"""Supervised fine-tuning: cross-entropy on the completion tokens of (prompt, completion) pairs.

Warm-starting a student (or training a teacher) before distillation is a normal OPD workflow.
A row is a problem and its worked solution; the prompt is the problem rendered with the same
`PromptTemplate` the distillation run uses, the completion is the solution followed by EOS, and
only the completion's tokens are learned (the prompt is context).
"""

import math
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader

from lit_opd.data.records import field, load_records
from lit_opd.data.templates import MATH_INSTRUCTION, PromptTemplate
from lit_opd.logprobs import token_logprobs
from lit_opd.loading import DType, load_causal_lm, load_tokenizer
from lit_opd.setting_checks import check_sft_settings

IGNORE_INDEX = -100


def completion_nll(logp: Tensor, labels: Tensor) -> Tensor:
    """Token-mean negative log-likelihood of the completion tokens.

    logp: [B, T] log π(x_{t+1}) of each next token; labels: [B, T] the next token, IGNORE_INDEX on
    prompt and padding positions.  loss = −Σ_t m_t logp_t / Σ_t m_t, m_t = (labels_t ≠ IGNORE_INDEX).
    """
    mask = labels != IGNORE_INDEX
    if not bool(mask.any()):
        raise ValueError("the batch has no completion token: nothing to learn")
    return -(logp * mask).sum() / mask.sum()


def sft_collate(examples: list[tuple[list[int], list[int]]], pad_token_id: int) -> dict[str, Tensor]:
    """(prompt ids, completion ids) pairs → right-padded
    input_ids [B, L], attention_mask [B, L] long, labels [B, L]: the completion ids at their
    positions, IGNORE_INDEX on the prompt and the padding (labels are aligned with input_ids; the
    shift to next-token targets happens in the loss)."""
    width = max(len(prompt) + len(completion) for prompt, completion in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, (prompt, completion) in enumerate(examples):
        length = len(prompt) + len(completion)
        input_ids[row, :length] = torch.tensor(prompt + completion, dtype=torch.long)
        attention_mask[row, :length] = 1
        labels[row, len(prompt) : length] = torch.tensor(completion, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class SFTDataModule(L.LightningDataModule):
    """(problem, solution) rows from a .jsonl / .json / .parquet file or an HF dataset.

    Args:
        tokenizer: path or hub id of the tokenizer (the model's).
        train_data / val_data: the rows; val_data is optional (then there is no validation).
        problem_field / solution_field: the row fields of the prompt's problem and the completion.
        chat_template / instruction: how a problem becomes a prompt (`PromptTemplate`); use the
            same as the distillation run, so the student is warm-started on the prompts it will see.
        max_length: rows whose prompt + completion + EOS is longer are dropped (a warning counts them).
        batch_size: rows per optimiser step; seed: the shuffling order.
    """

    def __init__(
        self,
        tokenizer: str,
        train_data: str,
        val_data: str | None = None,
        problem_field: str = "problem",
        solution_field: str = "solution",
        chat_template: bool = True,
        instruction: str = MATH_INSTRUCTION,
        max_length: int = 1024,
        batch_size: int = 32,
        seed: int = 0,
    ):
        super().__init__()
        if batch_size < 1 or max_length < 2:
            raise ValueError(f"need data.batch_size ≥ 1 and data.max_length ≥ 2, got {batch_size}, {max_length}")
        self.save_hyperparameters()
        self.template = PromptTemplate(chat=chat_template, instruction=instruction)
        self.train_examples: list[tuple[list[int], list[int]]] | None = None
        self.val_examples: list[tuple[list[int], list[int]]] | None = None
        self.pad_token_id: int | None = None

    def setup(self, stage: str) -> None:
        if self.train_examples is not None:
            return
        tokenizer = load_tokenizer(self.hparams.tokenizer, "tokenizer")
        self.pad_token_id = tokenizer.pad_token_id
        self.train_examples = self.encode(tokenizer, self.hparams.train_data)
        if self.hparams.val_data is not None:
            self.val_examples = self.encode(tokenizer, self.hparams.val_data)

    def encode(self, tokenizer, source: str) -> list[tuple[list[int], list[int]]]:
        """Rows of `source` → (prompt ids, solution ids + [eos]) pairs, too-long rows dropped."""
        hp = self.hparams
        rows = load_records(source)
        examples = []
        for row in rows:
            prompt = self.template.render(tokenizer, field(row, hp.problem_field, source))
            prompt_ids = tokenizer(prompt, add_special_tokens=not self.template.chat)["input_ids"]
            completion_ids = tokenizer(field(row, hp.solution_field, source), add_special_tokens=False)["input_ids"]
            completion_ids.append(tokenizer.eos_token_id)
            if len(prompt_ids) + len(completion_ids) <= hp.max_length:
                examples.append((prompt_ids, completion_ids))
        if not examples:
            raise ValueError(f"{source}: no row fits data.max_length={hp.max_length} tokens")
        if len(examples) < len(rows):
            rank_zero_warn(
                f"{source}: dropped {len(rows) - len(examples)} of {len(rows)} rows longer than "
                f"data.max_length={hp.max_length} tokens"
            )
        return examples

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_examples,
            batch_size=self.hparams.batch_size,
            shuffle=True,
            drop_last=len(self.train_examples) >= self.hparams.batch_size,
            generator=torch.Generator().manual_seed(self.hparams.seed),
            collate_fn=self.collate,
        )

    def val_dataloader(self) -> DataLoader:
        if self.val_examples is None:
            return []
        return DataLoader(self.val_examples, batch_size=self.hparams.batch_size, collate_fn=self.collate)

    def collate(self, examples: list[tuple[list[int], list[int]]]) -> dict[str, Tensor]:
        return sft_collate(examples, self.pad_token_id)


class SFTModule(L.LightningModule):
    """Fine-tunes a HF causal LM on completions: loss = token-mean NLL of the completion tokens
    (`completion_nll`), log-probs taken from hidden states in chunks (no [B, L, V] fp32 logits).

    Args:
        model: HF causal LM path or hub id (a directory written by `save_pretrained`, e.g. a
            freshly built `lit_opd.tiny.tiny_qwen3`, works the same).
        tokenizer: tokenizer path or hub id (default: the model's); saved beside the model.
        dtype: the weights' dtype.
        lr / weight_decay / betas: AdamW. warmup_steps: linear warm-up; then the learning rate
            follows `schedule` ("cosine": to 0 at the trainer's last step; "constant").
        chunk_size: positions per lm_head chunk.
    Logs train/loss (and val/loss with validation data).
    """

    def __init__(
        self,
        model: str,
        tokenizer: str | None = None,
        dtype: DType = "float32",
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 0,
        schedule: Literal["cosine", "constant"] = "cosine",
        chunk_size: int = 1024,
    ):
        super().__init__()
        check_sft_settings(lr, weight_decay, betas, warmup_steps, chunk_size)
        self.save_hyperparameters()
        self.tokenizer = load_tokenizer(tokenizer or model, "tokenizer")
        self.model = load_causal_lm(model, dtype, "model").train()  # from_pretrained returns eval mode

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """[B, L] → [B, L−1] log π(input_ids[:, t+1] | input_ids[:, ≤t])."""
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        weight = self.model.get_output_embeddings().weight
        return token_logprobs(hidden.last_hidden_state[:, :-1], weight, input_ids[:, 1:], self.hparams.chunk_size)

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        return completion_nll(self(batch["input_ids"], batch["attention_mask"]), batch["labels"][:, 1:])

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.log("val/loss", self.loss(batch), prog_bar=True)

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay, betas=hp.betas)
        total = max(int(self.trainer.estimated_stepping_batches), 1)

        def factor(step: int) -> float:
            if step < hp.warmup_steps:
                return (step + 1) / hp.warmup_steps
            if hp.schedule == "constant":
                return 1.0
            progress = min((step - hp.warmup_steps) / max(total - hp.warmup_steps, 1), 1.0)
            return 0.5 * (1.0 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the model and tokenizer as a HF checkpoint (loadable by `from_pretrained`)."""
        directory = Path(directory)
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        return directory
