"""Rollout collection: a teacher that scores beside generation gives the same mini-batches as one
that scores after it (the rows phased teacher sampling replaces included), and a failure in any
stage is settled on every rank before the next collective."""

import threading
import time

import pytest
import torch

from lit_opd.logprobs import CausalLMScorer
from lit_opd.rollout.collection import CollectionFailed, RolloutCollector
from lit_opd.rollout.engine import Generation, HFGenerateEngine, SamplingConfig
from lit_opd.rollout.scoring import ScoringSettings, score_rows
from lit_opd.rollout.settings import RolloutConfig
from lit_opd.rollout.teacher_engines import TeacherEngine
from lit_opd.verify import Verifier


class Events:
    def __init__(self):
        self.lock, self.names = threading.Lock(), []

    def add(self, name: str) -> None:
        with self.lock:
            self.names.append(name)


class SlowEngine(HFGenerateEngine):
    """HF `generate`, each call a little slower, its calls recorded."""

    def __init__(self, events: Events):
        self.events = events

    def generate(self, model, prompt_ids, *args):
        out = super().generate(model, prompt_ids, *args)
        time.sleep(0.2)
        self.events.add(f"generated {prompt_ids.shape[0]}")
        return out


class ModelTeacher(TeacherEngine):
    """A teacher outside the trainer (as far as collection knows) that scores with a model (0 off
    the response mask, as vLLM's prompt log-probs give) and whose every rollout is `response`;
    `beside` sets `scores_while_generating`."""

    def __init__(self, model, response: list[int], events: Events, beside: bool):
        self.scorer, self.response, self.events = CausalLMScorer(model), response, events
        self.scores_while_generating = beside

    def score(self, rows, top_k, exclude):
        self.events.add(f"scored {rows['input_ids'].shape[0]}")
        scores = score_rows(self.scorer, rows, ScoringSettings(batch_size=64), top_k, tuple(exclude))
        off = ~rows["response_mask"]  # 0 off the mask, as the teachers outside the trainer give
        return {key: value.masked_fill(off if value.dim() == 2 else off[..., None], 0) for key, value in scores.items()}

    def generate(self, prompt_ids, prompt_mask, sampling, eos_token_ids, pad_token_id, generator):
        ids = torch.tensor([self.response]).repeat(prompt_ids.shape[0], 1)
        return Generation(ids, torch.ones_like(ids, dtype=torch.bool))


def prompt_batch(tokenizer, texts, answers):
    rows = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    return {"prompt_ids": torch.tensor(rows), "prompt_mask": torch.ones(len(rows), len(rows[0]), dtype=torch.bool),
            "answers": answers, "num_minibatches": 2}


def collect(tokenizer, student, teacher_model, beside: bool, answer, any_failed=bool, verifier=None):
    events = Events()
    rollout = RolloutConfig(num_samples=2, max_new_tokens=4, temperature=1.0, generate_batch_size=2,
                            teacher_phases=[(0, 0.5)])
    teacher = ModelTeacher(teacher_model, answer, events, beside)
    collector = RolloutCollector(rollout, tokenizer, SlowEngine(events), teacher, ScoringSettings(top_k=5, exclude=(0,)),
                                 verifier or Verifier(num_workers=1))
    batch = prompt_batch(tokenizer, ["1+1=?", "0+2=?", "2+0=?", "1+3=?"], ["2", "2", "2", "4"])
    try:
        minibatches, stats = collector.collect(batch, 0, CausalLMScorer(student), torch.Generator().manual_seed(0),
                                               any_failed)
    finally:
        collector.close()
    return minibatches, stats, events.names


def test_scoring_beside_generation_equals_scoring_after(tiny_lm, char_tokenizer):
    """generate_batch_size 2 of 8 rows: each part goes to the teacher as it is generated, before the
    last part is; the rows the mix replaced (a longer teacher response, so every row is re-padded)
    are scored after it; every mini-batch equals the one scored after generation."""
    torch.manual_seed(1)
    teacher_model = type(tiny_lm)(tiny_lm.config).eval()
    answer = char_tokenizer.encode("\\boxed{2} done", add_special_tokens=False) + [char_tokenizer.eos_token_id]
    after, after_stats, after_events = collect(char_tokenizer, tiny_lm, teacher_model, False, answer)
    beside, beside_stats, beside_events = collect(char_tokenizer, tiny_lm, teacher_model, True, answer)
    assert after_stats["train/teacher_mixed_fraction"] > 0
    assert after_events == ["generated 2"] * 4 + ["scored 4"] * 2  # per mini-batch, after everything
    replaced = sum(int(mb["from_teacher"].sum()) for mb in beside)
    assert sorted(beside_events) == sorted(["generated 2"] * 4 + ["scored 2"] * 4 + [f"scored {replaced}"])
    assert beside_events.index("scored 2") < len(beside_events) - 1 - beside_events[::-1].index("generated 2")
    assert len(after) == len(beside) == 2
    for ours, theirs in zip(beside, after):
        assert ours.keys() == theirs.keys() and {"teacher_logp", "teacher_topk_ids"} <= ours.keys()
        for key in ours:  # the teacher's log-probs: forwards of other shapes round differently
            if ours[key].is_floating_point():
                torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-5, msg=key)
            else:
                assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.parametrize("beside", [False, True], ids=["after", "beside"])
def test_a_failure_of_this_rank_or_another_is_settled_before_the_next_collective(tiny_lm, char_tokenizer, beside):
    """The verifier failing here: every rank is told (the flag of the verify stage), and the student's
    scoring forwards (collectives when sharded) never run; another rank failing in its verify stage:
    this rank stops there too."""
    answer = char_tokenizer.encode("\\boxed{2}", add_special_tokens=False) + [char_tokenizer.eos_token_id]

    class BrokenVerifier(Verifier):
        def verify_batch(self, *args, **kwargs):
            raise OSError("the verifier pool died\nsecond line")

    flags = []
    with pytest.raises(CollectionFailed, match=r"^OSError: the verifier pool died$") as error:
        collect(char_tokenizer, tiny_lm, tiny_lm, beside, answer, lambda flag: flags.append(flag) or flag,
                BrokenVerifier(num_workers=1))
    assert flags == [False, True] and isinstance(error.value.__cause__, OSError)

    flags = []
    with pytest.raises(CollectionFailed, match="failed on another rank"):
        collect(char_tokenizer, tiny_lm, tiny_lm, beside, answer, lambda flag: flags.append(flag) or len(flags) == 2)
    assert flags == [False, False]


def test_a_sleeping_vllm_engine_wakes_once_for_the_parts_of_a_rollout_batch(tiny_lm, char_tokenizer, monkeypatch):
    """Rollouts cut in parts (for a teacher that scores beside generation): the engine wakes before
    the first part and sleeps after the last, not between parts; a single call wakes and sleeps."""
    from lit_opd.rollout import vllm_engine
    from lit_opd.rollout.generation import generate_rows

    class FakeLLM:
        def __init__(self):
            self.calls = []

        def wake_up(self, tags):
            self.calls.append(f"wake_up {tags[0]}")

        def sleep(self, level):
            self.calls.append("sleep")

        def collective_rpc(self, method, kwargs):
            self.calls.append(method)

    llm = FakeLLM()

    def sample(engine_llm, prompt_ids, *args):
        engine_llm.calls.append("sample")
        ids = torch.ones(prompt_ids.shape[0], 3, dtype=torch.long)
        return Generation(ids, torch.ones_like(ids, dtype=torch.bool), torch.zeros(ids.shape))

    monkeypatch.setattr(vllm_engine, "sample", sample)
    monkeypatch.setattr(vllm_engine.VLLMEngine, "sleeps", property(lambda self: True))
    engine = vllm_engine.VLLMEngine("unused")
    engine.llm = llm  # started, asleep between rollout batches
    ids, mask = torch.ones(6, 2, dtype=torch.long), torch.ones(6, 2, dtype=torch.bool)
    args = (ids, mask, SamplingConfig(3), [char_tokenizer.eos_token_id], char_tokenizer.pad_token_id, torch.Generator())
    parts = []
    generation = generate_rows(engine, CausalLMScorer(tiny_lm), *args, batch_size=2,
                               on_part=lambda first, part: parts.append(first))
    assert parts == [0, 2, 4] and generation.response_ids.shape == (6, 3)
    woken = ["wake_up weights", "reload_weights", "wake_up kv_cache"]  # level 2 sleep dropped the weights
    assert llm.calls == [*woken, "sample", "sample", "sample", "sleep"]
    llm.calls.clear()
    generate_rows(engine, CausalLMScorer(tiny_lm), *args, batch_size=2)
    assert llm.calls == [*woken, "sample", "sleep"]
