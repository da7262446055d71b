"""Full-vocabulary GKD baseline: generalised JSD(β) between student and teacher at every
response position, computed chunked (teacher forward per step: full logits are not cached)."""

import torch

from lit_opd.logprobs import chunked_generalized_jsd, token_logprobs
from lit_opd.modules.base import DistillationModule
from lit_opd.setting_checks import check_range


class GKD(DistillationModule):
    """ℓ_t = β·KL(T ‖ M) + (1−β)·KL(S ‖ M), M = βT + (1−β)S, over the full vocabulary at
    temperature τ (β=0 forward KL, β=1 reverse KL; `losses.generalized_jsd`), on the student's
    own samples. Teacher and student must share the vocabulary and the lm_head row count; the
teacher's full logits come from the teacher in the trainer (`TrainerTeacher.scorer`), so the
teacher factory refuses a teacher outside it (`full_teacher_logits`).

    Args:
        beta, temperature: β and τ of the divergence.
        **kwargs: the shared arguments of `DistillationModule` (student, teacher, rollout, gates, ...).
    """

    full_teacher_logits = "GKD's full-vocabulary divergence"

    def __init__(self, *, beta: float = 0.5, temperature: float = 1.0, **kwargs):
        check_range("model.init_args.beta", beta, 0, 1)
        check_range("model.init_args.temperature", temperature, 0, low_open=True)
        super().__init__(**kwargs)
        self.beta, self.temperature = beta, temperature

    def configure_model(self) -> None:
        from lightning.pytorch.strategies import FSDPStrategy

        if self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy):
            raise ValueError(
                "GKD reads hidden states and lm_head weights outside a forward, which FSDPStrategy (FSDP1) "
                "cannot gather: use ModelParallelStrategy (FSDP2, configs/strategies/fsdp2.yaml)"
            )
        super().configure_model()
        student_rows = self.policy.lm_head_weight.shape[0]
        teacher_rows = self.teacher.scorer.lm_head_weight.shape[0]
        if student_rows != teacher_rows:
            raise ValueError(f"GKD needs equal lm_head sizes: student {student_rows} rows, teacher {teacher_rows}")

    def student_scores(self, mb):
        T = mb["response_ids"].shape[1]
        hidden = self.policy.response_hidden(mb["input_ids"], mb["attention_mask"], T)
        with torch.no_grad():
            teacher_hidden = self.teacher.scorer.response_hidden(mb["input_ids"], mb["attention_mask"], T)
        logp = token_logprobs(hidden, self.policy.lm_head_weight, mb["response_ids"], self.chunk_size)
        return {"logp": logp, "hidden": hidden, "teacher_hidden": teacher_hidden}

    def per_token_loss(self, mb, scores):
        jsd = chunked_generalized_jsd(
            scores["hidden"], self.policy.lm_head_weight, scores["teacher_hidden"], self.teacher.scorer.lm_head_weight,
            self.beta, self.temperature, self.chunk_size,
        )
        return jsd.masked_fill(~mb["response_mask"], 0.0)
