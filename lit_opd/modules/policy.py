"""A single HF causal LM as a LightningModule, for `lit-opd validate|test` of a plain model (the
"before training" row of every table) through the PassAtKEvaluation callback."""

import lightning as L
import torch

from lit_opd.data.templates import PromptTemplate, eos_token_ids
from lit_opd.modules.mixin import DType, load_causal_lm, load_tokenizer
from lit_opd.rollout.engine import Generation, HFGenerateEngine, SamplingConfig


class PolicyEvaluation(L.LightningModule):
    """Args: student: the model to evaluate (path or hub id); tokenizer: default the model's;
    engine: "fast" (static KV cache) or "hf"."""

    def __init__(self, student: str, tokenizer: str | None = None, dtype: DType = "bfloat16", engine: str = "fast"):
        super().__init__()
        self.save_hyperparameters()
        self.tokenizer = load_tokenizer(tokenizer or student, "tokenizer")
        self.student_path, self.dtype_name, self.engine_name = student, dtype, engine
        self.student = None

    @property
    def prompt_template(self) -> PromptTemplate:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer else None
        return getattr(datamodule, "template", PromptTemplate())

    def configure_model(self) -> None:
        if self.student is None:
            self.student = load_causal_lm(self.student_path, self.dtype_name, "student").eval()

    def setup(self, stage: str) -> None:
        if self.engine_name == "fast":
            from lit_opd.rollout.fast import StaticCacheEngine

            self.engine = StaticCacheEngine()
        else:
            self.engine = HFGenerateEngine()

    @torch.no_grad()
    def generate_responses(self, prompt_ids, prompt_mask, sampling: SamplingConfig, generator) -> Generation:
        return self.engine.generate(self.student, prompt_ids, prompt_mask, sampling, eos_token_ids(self.tokenizer),
                                    self.tokenizer.pad_token_id, generator)

    def validation_step(self, batch, batch_idx) -> None:
        """No-op: the PassAtKEvaluation callback evaluates."""

    def test_step(self, batch, batch_idx) -> None:
        """No-op: the PassAtKEvaluation callback evaluates."""
