"""The vllm rollout engine for real (vLLM's CPU backend, in-process): its sampled-token log-probs
against the trainer's scorer, weight sync after an optimiser step (tied and untied embeddings),
seeded repeats, and `lit-opd fit` end to end. Without vLLM these skip, and asking for the engine
is a one-line error naming the extra."""

import importlib.util

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from lit_opd.logprobs import CausalLMScorer
from lit_opd.rollout.engine import HFGenerateEngine, SamplingConfig, build_engine

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed (pip install \"lit-opd[vllm]\")")


@pytest.mark.skipif(HAVE_VLLM, reason="vLLM is installed")
def test_without_vllm_the_engine_is_a_one_line_error_naming_the_extra():
    with pytest.raises(ImportError, match=r'pip install "lit-opd\[vllm\]"') as error:
        build_engine("vllm", "some/student")
    assert "\n" not in str(error.value)


def tiny_checkpoint(path, tokenizer, tied: bool, seed: int = 0) -> str:
    """A tiny float32 Qwen3 that vLLM's CPU attention accepts (head_dim 32)."""
    config = Qwen3Config(
        vocab_size=-(-len(tokenizer) // 64) * 64, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
        tie_word_embeddings=tied, initializer_range=0.2, bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    Qwen3ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, char_tokenizer):
    root = tmp_path_factory.mktemp("vllm")
    return {tied: tiny_checkpoint(root / f"tied{tied}", char_tokenizer, tied) for tied in (False, True)}


def prompts(tokenizer, texts):
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    P = max(map(len, rows))
    ids = torch.tensor([[tokenizer.pad_token_id] * (P - len(r)) + r for r in rows])
    mask = torch.tensor([[False] * (P - len(r)) + [True] * len(r) for r in rows])
    return ids, mask


@needs_vllm
@pytest.mark.slow
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_vllm_logprobs_and_weight_sync_match_the_trainer(tied, checkpoints, char_tokenizer):
    from lit_opd.rollout.vllm_engine import VLLMEngine, VLLMSettings

    model = Qwen3ForCausalLM.from_pretrained(checkpoints[tied], dtype=torch.float32)
    engine = VLLMEngine(checkpoints[tied], VLLMSettings(gpu_memory_utilization=0.05, max_model_len=128))
    ids, mask = prompts(char_tokenizer, ["12+7=", "what is 3*4?", "x"])
    eos, pad = [char_tokenizer.eos_token_id], char_tokenizer.pad_token_id

    sampled = engine.generate(model, ids, mask, SamplingConfig(24, temperature=1.0), eos, pad, torch.Generator().manual_seed(0))
    scorer = CausalLMScorer(model)
    with torch.no_grad():
        trainer_logp = scorer(torch.cat([ids, sampled.response_ids], 1), torch.cat([mask, sampled.response_mask], 1),
                              sampled.response_ids.shape[1])["logp"]
    m = sampled.response_mask
    torch.testing.assert_close(sampled.logp[m], trainer_logp[m], atol=1e-4, rtol=0)
    again = engine.generate(model, ids, mask, SamplingConfig(24, temperature=1.0), eos, pad, torch.Generator().manual_seed(0))
    assert torch.equal(again.response_ids, sampled.response_ids), "a seeded generator must repeat the rollouts"

    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    loss = -scorer(torch.cat([ids, sampled.response_ids], 1), torch.cat([mask, sampled.response_mask], 1),
                   sampled.response_ids.shape[1])["logp"][m].mean()
    loss.backward()
    optimizer.step()
    greedy = SamplingConfig(24, temperature=0)
    before = engine.synced
    ours = HFGenerateEngine().generate(model.eval(), ids, mask, greedy, eos, pad, torch.Generator())
    theirs = engine.generate(model, ids, mask, greedy, eos, pad, torch.Generator())
    assert engine.synced != before, "the changed weights were not pushed"
    engine.close()
    assert torch.equal(theirs.response_ids, ours.response_ids)
    assert torch.equal(theirs.response_mask, ours.response_mask)


@needs_vllm
@pytest.mark.slow
def test_fit_with_the_vllm_engine(checkpoints, tmp_path, monkeypatch):
    """`lit-opd fit --config opd` with rollout.engine vllm: the student moves, and vLLM's log-probs
    agree with the trainer's on every step's rollouts (rollout/logp_mismatch)."""
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from helpers_cli import fit_and_check

    monkeypatch.chdir(tmp_path)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"problem": f"{i}+{i}=?", "answer": str(2 * i)}) + "\n" for i in range(8)))
    models = {"student": checkpoints[True], "teacher": checkpoints[False]}
    fit_and_check("opd", models, str(data), tmp_path / "tb", "--model.init_args.rollout.engine=vllm",
                  "--model.init_args.rollout.vllm.gpu_memory_utilization=0.05",
                  "--model.init_args.rollout.vllm.max_model_len=256", tags={"rollout/logp_mismatch"})
    events = EventAccumulator(str(tmp_path / "tb" / "run" / "version_0"))
    events.Reload()
    mismatch = [event.value for event in events.Scalars("rollout/logp_mismatch")]
    assert len(mismatch) == 2 and max(mismatch) < 1e-4
