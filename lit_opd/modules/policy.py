"""A single HF causal LM as a LightningModule, for `lit-opd validate|test` of a plain model (the
"before training" row of every table) through the PassAtKEvaluation callback."""

import lightning as L
import torch

from lit_opd.data.templates import PromptTemplate, datamodule_template, eos_token_ids
from lit_opd.loading import DType, load_causal_lm, load_tokenizer
from lit_opd.rollout.engine import EngineName, Generation, SamplingConfig
from lit_opd.rollout.factory import build_engine
from lit_opd.rollout.vllm_engine import VLLMSettings


class PolicyEvaluation(L.LightningModule):
    """Args: student: the model to evaluate (path or hub id); tokenizer: default the model's;
    engine: "static" (static KV cache), "hf" (HF `generate`) or "vllm" (with `vllm`'s settings)."""

    def __init__(self, student: str, tokenizer: str | None = None, dtype: DType = "bfloat16",
                 engine: EngineName = "static", vllm: VLLMSettings | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.tokenizer = load_tokenizer(tokenizer or student, "tokenizer")
        self.student_path, self.dtype_name = student, dtype
        self.engine = build_engine(engine, student, vllm)
        self.student = None

    @property
    def prompt_template(self) -> PromptTemplate:
        return datamodule_template(self._trainer)

    def configure_model(self) -> None:
        if self.student is None:
            self.student = load_causal_lm(self.student_path, self.dtype_name, "student", self.tokenizer).eval()

    @torch.no_grad()
    def generate_responses(self, prompt_ids, prompt_mask, sampling: SamplingConfig, generator) -> Generation:
        return self.engine.generate(self.student, prompt_ids, prompt_mask, sampling, eos_token_ids(self.tokenizer),
                                    self.tokenizer.pad_token_id, generator)

    def teardown(self, stage: str) -> None:
        self.engine.close()

    def validation_step(self, batch, batch_idx) -> None:
        """No-op: the PassAtKEvaluation callback evaluates."""

    def test_step(self, batch, batch_idx) -> None:
        """No-op: the PassAtKEvaluation callback evaluates."""
