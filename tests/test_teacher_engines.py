"""Teachers outside the trainer, without vLLM: turning vLLM prompt log-probs into the trainer's
teacher scores (hand values) and the settings that refuse to combine. vLLM's own engine and a real
`vllm serve` are tested in tests/test_vllm.py; an unreachable server's checkpoint-then-stop in
tests/test_resume.py."""

import pytest
import torch

from lit_opd.modules import GKD, SampledTokenOPD
from lit_opd.rollout.teacher_engines import TeacherServing, scores_from_prompt_logprobs


def test_scores_from_prompt_logprobs_hand_values():
    """Row 0: prompt [7], response [5, 3] (the last 2 of its 3 positions); row 1: prompt [7, 8],
    response [4] and a padded column. Top-2 outside exclude {9}, by decreasing log-prob."""
    positions = [
        [None, {5: -0.5, 9: -0.1, 2: -2.0}, {3: -1.5, 1: -0.2, 9: -0.3, 6: -0.9}],
        [None, {8: -0.7}, {4: -3.0, 9: -0.05, 2: -0.4, 6: -1.0}],
    ]
    response_ids = torch.tensor([[5, 3], [4, 0]])
    mask = torch.tensor([[True, True], [True, False]])
    scores = scores_from_prompt_logprobs(positions, response_ids, mask, top_k=2, exclude={9})
    torch.testing.assert_close(scores["logp"], torch.tensor([[-0.5, -1.5], [-3.0, 0.0]]))
    assert scores["topk_ids"].tolist() == [[[5, 2], [1, 6]], [[2, 6], [0, 0]]]
    torch.testing.assert_close(scores["topk_logp"], torch.tensor([[[-0.5, -2.0], [-0.2, -0.9]], [[-0.4, -1.0], [0.0, 0.0]]]))
    assert set(scores_from_prompt_logprobs(positions, response_ids, mask, top_k=0, exclude=set())) == {"logp"}


def test_gkd_refuses_a_teacher_outside_the_trainer(tiny_checkpoints):
    for where in ({"teacher_engine": "vllm"}, {"teacher_url": "http://localhost:8000"}):
        with pytest.raises(ValueError, match="GKD's full-vocabulary divergence needs the teacher's logits"):
            GKD(student=tiny_checkpoints["student"], teacher=tiny_checkpoints["teacher"], **where)


def test_a_teacher_url_and_a_colocated_teacher_engine_are_one_too_many(tiny_checkpoints):
    with pytest.raises(ValueError, match="model.teacher_url and model.teacher_engine: vllm both place the teacher"):
        SampledTokenOPD(student=tiny_checkpoints["student"], teacher=tiny_checkpoints["teacher"],
                        teacher_engine="vllm", teacher_url="http://localhost:8000")


@pytest.mark.parametrize("field, value", [("rows_per_request", 0), ("max_concurrency", 0), ("timeout_s", 0.0),
                                          ("gpu_memory_utilization", 0.0), ("retries", -1), ("backoff_s", -1.0),
                                          ("max_model_len", 0), ("kv_cache_memory_bytes", 0)])
def test_teacher_serving_settings_out_of_range_name_their_field(field, value):
    with pytest.raises(ValueError, match=rf"model.(init_args.)?teacher_serving.{field} must be"):
        TeacherServing(**{field: value})


def test_the_default_retry_budget_ends_inside_the_default_collective_timeout():
    """6 tries × 240 s + 2·(1 + 2 + 4 + 8 + 16) s of backoff = 1502 s < 1800 s (Lightning's default)."""
    from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout

    assert TeacherServing().give_up_after_s() == 6 * 240 + 2 * 31 == 1502
    assert TeacherServing().give_up_after_s() < default_pg_timeout.total_seconds() == 1800
