"""The teacher in the trainer (`teacher_engine: trainer`): a frozen HF causal LM beside the
student, behind the same interface as the teachers outside it (`TeacherEngine`)."""

from collections.abc import Callable

from torch import Tensor, nn

from lit_opd.rollout.engine import RolloutEngine, SamplingConfig
from lit_opd.rollout.generation import generate_rows
from lit_opd.rollout.scoring import ScoringSettings, score_rows
from lit_opd.rollout.teacher_engines import TeacherEngine


class TrainerTeacher(nn.Module, TeacherEngine):
    """A frozen teacher held by the trainer. It is an `nn.Module` that the LightningModule registers
    as `teacher`, so it moves to the device with it, is sharded like the student (`distribute`) and
    its `teacher.` keys are what checkpoints leave out; GKD reads its full logits from `scorer`.

    scorer: the frozen model as a `CausalLMScorer`; engine: its own generation engine for teacher
    rollouts (never the student's, whose weights a vLLM engine holds), called with at most
    generate_batch_size rows (0: all); scoring: the forwards' sizes (`ScoringSettings`).
    """

    def __init__(self, scorer: nn.Module, engine: RolloutEngine, scoring: ScoringSettings, generate_batch_size: int = 0):
        super().__init__()
        self.scorer = scorer
        self.engine, self.scoring, self.generate_batch_size = engine, scoring, generate_batch_size

    def distribute(self, place: Callable[[nn.Module], nn.Module]) -> None:
        self.scorer = place(self.scorer)

    def score(self, rows: dict[str, Tensor], top_k: int, exclude: set[int]) -> dict[str, Tensor]:
        """No-grad teacher log-probs (and top-K outside `exclude`) of `rows`' responses (`score_rows`)."""
        return score_rows(self.scorer, rows, self.scoring, top_k, tuple(exclude))

    def generate(self, prompt_ids, prompt_mask, sampling: SamplingConfig, eos_token_ids, pad_token_id, generator):
        return generate_rows(self.engine, self.scorer, prompt_ids, prompt_mask, sampling, eos_token_ids, pad_token_id,
                             generator, self.generate_batch_size)

    def close(self) -> None:
        self.engine.close()
