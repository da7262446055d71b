"""The static-KV-cache rollout engine against HF on tiny random models of the Qwen3, Qwen2 and Llama families:
greedy tokens equal HF `generate`'s, log-probs equal a fresh forward pass, stops and padding,
weight updates, sampling filters, seeded determinism, the fallback for other architectures, and
`build_engine`."""

import contextlib
import logging

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers import Qwen3Config, Qwen3ForCausalLM

import lit_opd.rollout.static_cache as static_cache
from lit_opd.rollout.decoder import Decoder, sample_tokens, unsupported_reason
from lit_opd.rollout.engine import Generation, HFGenerateEngine, SamplingConfig
from lit_opd.rollout.factory import build_engine
from lit_opd.rollout.static_cache import StaticCacheEngine


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield

VOCAB = 96
PAD = 0
SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    # A wide initialisation makes the logits far apart, so that float rounding cannot flip an argmax.
    initializer_range=0.3,
    pad_token_id=PAD,
    tie_word_embeddings=False,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


def build(family: str, seed: int = 0, **overrides):
    configs = {
        "qwen3": lambda: (Qwen3ForCausalLM, Qwen3Config(head_dim=8, **SHAPE, **overrides)),
        "qwen2": lambda: (Qwen2ForCausalLM, Qwen2Config(**SHAPE, **overrides)),
        "llama": lambda: (
            LlamaForCausalLM,
            LlamaConfig(attention_bias=True, mlp_bias=True, rope_parameters=LLAMA3_ROPE, **SHAPE, **overrides),
        ),
    }
    model_class, config = configs[family]()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return model_class(config).eval()


def left_padded_prompts(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, max(lengths)] random prompts (ids ≥ 1) of the given lengths, left-padded with PAD."""
    g = torch.Generator().manual_seed(seed)
    P = max(lengths)
    mask = torch.arange(P)[None, :] >= P - torch.tensor(lengths)[:, None]
    ids = torch.randint(1, VOCAB, (len(lengths), P), generator=g).masked_fill(~mask, PAD)
    return ids, mask


def fresh_logits(model, prompt_ids, prompt_mask, response_ids, response_mask) -> torch.Tensor:
    """[B, T, V] float32 logits predicting each response token, from one full forward pass with
    generate's positions (cumsum of the mask − 1)."""
    mask = torch.cat([prompt_mask, response_mask], dim=1)
    positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
    logits = model(
        input_ids=torch.cat([prompt_ids, response_ids], dim=1), attention_mask=mask.long(), position_ids=positions
    ).logits
    P, T = prompt_ids.shape[1], response_ids.shape[1]
    return logits[:, P - 1 : P + T - 1].float()


def generate(engine, model, prompts, sampling, eos=(), seed=0):
    ids, mask = prompts
    return engine.generate(model, ids, mask, sampling, list(eos), PAD, torch.Generator().manual_seed(seed))


def greedy_eos(model, prompts, max_new_tokens) -> int:
    """A token that greedy decoding emits mid-way through row 0 but not as row 0's first token, so that
    with it as EOS some rows stop early."""
    tokens = generate(HFGenerateEngine(), model, prompts, SamplingConfig(max_new_tokens, temperature=0)).response_ids
    return next(int(t) for t in tokens[0, max_new_tokens // 3 :] if t != tokens[0, 0])


@pytest.mark.parametrize("family", ["qwen3", "qwen2", "llama"])
def test_greedy_equals_hf_generate_with_left_padding_and_eos(family):
    model = build(family)
    prompts = left_padded_prompts([5, 9, 2, 7])
    sampling = SamplingConfig(max_new_tokens=24, temperature=0)
    eos = [greedy_eos(model, prompts, 24), VOCAB - 1]
    hf = generate(HFGenerateEngine(), model, prompts, sampling, eos)
    static = generate(StaticCacheEngine(), model, prompts, sampling, eos)
    assert unsupported_reason(model) is None
    assert torch.equal(static.response_ids, hf.response_ids)
    assert torch.equal(static.response_mask, hf.response_mask)
    assert static.response_mask.sum(dim=1).min() < 24, "no row stopped at EOS: the test lost its point"


def test_greedy_equals_hf_generate_on_the_project_tiny_lm(tiny_lm, char_tokenizer):
    prompts = left_padded_prompts([3, 11, 6], seed=1)
    sampling = SamplingConfig(max_new_tokens=16, temperature=0)
    eos = [char_tokenizer.eos_token_id]
    hf = generate(HFGenerateEngine(), tiny_lm, prompts, sampling, eos)
    static = generate(StaticCacheEngine(), tiny_lm, prompts, sampling, eos)
    assert torch.equal(static.response_ids, hf.response_ids)


@pytest.mark.parametrize("family", ["qwen3", "qwen2", "llama"])
def test_logp_equals_a_fresh_forward_pass(family):
    model = build(family, seed=1)
    prompts = left_padded_prompts([4, 10, 1, 6], seed=2)
    sampling = SamplingConfig(max_new_tokens=20, temperature=0.8, top_p=0.9)
    out = generate(StaticCacheEngine(), model, prompts, sampling, eos=[7, 11], seed=3)
    logits = fresh_logits(model, *prompts, out.response_ids, out.response_mask)
    expected = torch.log_softmax(logits, dim=-1).gather(2, out.response_ids[..., None])[..., 0]
    m = out.response_mask
    torch.testing.assert_close(out.logp[m], expected[m], atol=1e-4, rtol=0)
    assert out.logp.dtype == torch.float32 and out.sample_logp.dtype == torch.float32
    assert (out.logp[~m] == 0).all() and (out.sample_logp[~m] == 0).all()


def test_sample_logp_is_the_tempered_and_filtered_distribution():
    model = build("qwen3", seed=2)
    prompts = left_padded_prompts([3, 8], seed=4)
    for sampling in (
        SamplingConfig(max_new_tokens=12, temperature=0.5),
        SamplingConfig(max_new_tokens=12, temperature=1.3, top_k=5),
    ):
        out = generate(StaticCacheEngine(), model, prompts, sampling, seed=5)
        logits = fresh_logits(model, *prompts, out.response_ids, out.response_mask) / sampling.temperature
        if sampling.top_k:
            kth = logits.topk(sampling.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        expected = torch.log_softmax(logits, dim=-1).gather(2, out.response_ids[..., None])[..., 0]
        torch.testing.assert_close(out.sample_logp, expected, atol=1e-4, rtol=0)
    greedy = generate(StaticCacheEngine(), model, prompts, SamplingConfig(max_new_tokens=5, temperature=0))
    assert (greedy.sample_logp == 0).all()


def test_sampled_tokens_stay_inside_top_k_and_top_p():
    model = build("llama", seed=3)
    prompts = left_padded_prompts([2, 6, 9, 4], seed=6)
    for sampling in (
        SamplingConfig(max_new_tokens=16, temperature=1.0, top_k=3),
        SamplingConfig(max_new_tokens=16, temperature=1.0, top_p=0.5),
    ):
        out = generate(StaticCacheEngine(), model, prompts, sampling, seed=7)
        probs = torch.softmax(fresh_logits(model, *prompts, out.response_ids, out.response_mask), dim=-1)
        chosen = probs.gather(2, out.response_ids[..., None])
        rank = (probs > chosen).sum(dim=-1)
        mass_before = (probs * (probs > chosen)).sum(dim=-1)
        inside = rank < sampling.top_k if sampling.top_k else mass_before < sampling.top_p + 1e-5
        assert inside[out.response_mask].all()


def test_first_token_frequencies_follow_the_sampling_distribution():
    """4,000 copies of one prompt: the empirical distribution of the first token matches softmax(z / τ)."""
    model = build("qwen3", seed=4)
    ids, mask = left_padded_prompts([5], seed=8)
    rows = 4000
    sampling = SamplingConfig(max_new_tokens=1, temperature=2.0)
    out = StaticCacheEngine().generate(
        model, ids.repeat(rows, 1), mask.repeat(rows, 1), sampling, [], PAD, torch.Generator().manual_seed(9)
    )
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=ids).logits[0, -1] / 2.0, dim=-1)
    frequencies = torch.bincount(out.response_ids[:, 0], minlength=VOCAB).float() / rows
    # Binomial standard error ≤ sqrt(0.25 / 4000) ≈ 0.008; 0.04 is five of them.
    assert (frequencies - probs).abs().max() < 0.04
    assert probs.max() > 0.05, "a near-uniform distribution would make the test weak"


def test_stops_pads_and_trims():
    model = build("qwen3", seed=5)
    prompts = left_padded_prompts([6, 3, 8], seed=10)
    sampling = SamplingConfig(max_new_tokens=30, temperature=0)
    free = generate(StaticCacheEngine(), model, prompts, sampling).response_ids
    # Each row's EOS: its own 4th, 8th and 2nd greedy token (chosen where it has not appeared before).
    eos, stops = [], []
    for row, position in zip(free, (3, 7, 1)):
        position = next(p for p in range(position, 30) if row[p] not in row[:p] and int(row[p]) not in eos)
        eos.append(int(row[position]))
    for row in free:
        stops.append(next(p for p in range(30) if int(row[p]) in eos))
    out = generate(StaticCacheEngine(), model, prompts, sampling, eos)
    lengths = torch.tensor(stops) + 1
    assert out.response_ids.shape == (3, int(lengths.max())), "trailing all-padding columns are trimmed"
    assert torch.equal(out.response_mask.sum(dim=1), lengths)
    for row, length in enumerate(lengths.tolist()):
        assert torch.equal(out.response_ids[row, :length], free[row, :length])
        assert (out.response_ids[row, length:] == PAD).all()
        assert int(out.response_ids[row, length - 1]) in eos
    assert (out.logp[~out.response_mask] == 0).all() and (out.logp[out.response_mask] < 0).all()


def test_without_eos_every_row_runs_to_max_new_tokens():
    model = build("qwen2", seed=6)
    out = generate(StaticCacheEngine(), model, left_padded_prompts([1, 4]), SamplingConfig(max_new_tokens=9))
    assert out.response_ids.shape == (2, 9) and out.response_mask.all()
    one = generate(StaticCacheEngine(), model, left_padded_prompts([1, 4]), SamplingConfig(max_new_tokens=1))
    assert one.response_ids.shape == (2, 1)


def test_sees_weight_updates():
    model = build("qwen3", seed=7)
    prompts = left_padded_prompts([4, 7], seed=11)
    sampling = SamplingConfig(max_new_tokens=12, temperature=0)
    engine = StaticCacheEngine()
    before = generate(engine, model, prompts, sampling)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    with torch.enable_grad():
        logits = fresh_logits(model, *prompts, before.response_ids, before.response_mask)
        torch.log_softmax(logits, dim=-1).gather(2, before.response_ids[..., None]).sum().mul(-1).backward()
    optimizer.step()  # in place, as training does: the engine must read the new values
    after = generate(engine, model, prompts, sampling)
    hf = generate(HFGenerateEngine(), model, prompts, sampling)
    assert not torch.equal(after.logp, before.logp)
    assert torch.equal(after.response_ids, hf.response_ids)
    logits = fresh_logits(model, *prompts, after.response_ids, after.response_mask)
    expected = torch.log_softmax(logits, dim=-1).gather(2, after.response_ids[..., None])[..., 0]
    torch.testing.assert_close(after.logp, expected, atol=1e-4, rtol=0)


def test_a_seeded_generator_gives_the_same_rollouts():
    model = build("llama", seed=8)
    prompts = left_padded_prompts([3, 5, 8], seed=12)
    sampling = SamplingConfig(max_new_tokens=16, temperature=1.0, top_p=0.95)
    engine = StaticCacheEngine()
    first = generate(engine, model, prompts, sampling, seed=1)
    again = generate(engine, model, prompts, sampling, seed=1)
    other = generate(engine, model, prompts, sampling, seed=2)
    assert torch.equal(first.response_ids, again.response_ids) and torch.equal(first.logp, again.logp)
    assert not torch.equal(first.response_ids, other.response_ids)


def test_sample_tokens_greedy_and_top_k_one_agree():
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(0))
    uniform = torch.rand(5, 40, generator=torch.Generator().manual_seed(1))
    uniform[0] = 0  # the smallest draw must not let a token outside the top-k win
    greedy, logp, sample_logp = sample_tokens(logits, SamplingConfig(temperature=0), None)
    top1, logp1, sample_logp1 = sample_tokens(logits, SamplingConfig(temperature=0.7, top_k=1), uniform)
    assert torch.equal(greedy, logits.argmax(dim=-1)) and torch.equal(top1, greedy)
    torch.testing.assert_close(logp, torch.log_softmax(logits, dim=-1).max(dim=-1).values)
    assert torch.equal(logp1, logp) and (sample_logp == 0).all() and (sample_logp1 == 0).all()


def test_bfloat16_and_autocast_run_close_to_a_fresh_forward():
    model = build("qwen3", seed=9)
    prompts = left_padded_prompts([5, 2], seed=13)
    sampling = SamplingConfig(max_new_tokens=8, temperature=1.0)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    for context, dtype in ((autocast, torch.float32), (contextlib.nullcontext(), torch.bfloat16)):
        model = model.to(dtype)
        with context:
            out = generate(StaticCacheEngine(), model, prompts, sampling, seed=4)
            logits = fresh_logits(model, *prompts, out.response_ids, out.response_mask)
        expected = torch.log_softmax(logits, dim=-1).gather(2, out.response_ids[..., None])[..., 0]
        torch.testing.assert_close(out.logp, expected, atol=0.1, rtol=0)


def test_unsupported_models_fall_back_to_hf_generate_and_say_so_once(caplog):
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=64)).eval()
    dynamic_rope = build("qwen3", rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    sliding = build("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=0)
    prompts = left_padded_prompts([3, 6], seed=14)
    sampling = SamplingConfig(max_new_tokens=6, temperature=0)
    engine = StaticCacheEngine()
    for model in (gpt2, dynamic_rope, sliding):
        assert unsupported_reason(model) is not None
        with caplog.at_level(logging.WARNING, logger="lit_opd.rollout.static_cache"):
            caplog.clear()
            out = generate(engine, model, prompts, sampling, eos=[5])
            again = generate(engine, model, prompts, sampling, eos=[5])
        assert [r.levelno for r in caplog.records] == [logging.WARNING], "one warning per reason"
        assert "falls back to HF generate" in caplog.records[0].getMessage()
        hf = generate(HFGenerateEngine(), model, prompts, sampling, eos=[5])
        assert torch.equal(out.response_ids, hf.response_ids)
        assert torch.equal(out.response_ids, again.response_ids)


def test_build_engine_by_name():
    assert type(build_engine("static")) is StaticCacheEngine
    assert type(build_engine("hf")) is HFGenerateEngine
    with pytest.raises(ValueError, match="unknown rollout engine"):
        build_engine("sglang")


def test_rejects_prompts_that_are_not_left_padded():
    model = build("qwen3")
    ids, mask = left_padded_prompts([3, 5])
    with pytest.raises(ValueError, match="left-padded"):
        StaticCacheEngine().generate(model, ids, mask.flip(1), SamplingConfig(), [], PAD, torch.Generator())
    with pytest.raises(ValueError, match="bool"):
        StaticCacheEngine().generate(model, ids, mask.long(), SamplingConfig(), [], PAD, torch.Generator())


class EagerReplay:
    """Stands in for a captured CUDA graph on CPU: replay() runs the decode step it would have captured."""

    def __init__(self, rollout, kv_len):
        self.rollout, self.kv_len = rollout, kv_len

    def replay(self):
        self.rollout.decode(self.kv_len)


def test_graph_bookkeeping_equals_the_eager_engine_on_cpu(monkeypatch):
    """The CUDA-graph path minus the GPU: bucketed prompt padding, full-bucket masked attention, state
    reused across calls and reset by each prefill, graphs picked by cache length."""
    monkeypatch.setattr(
        static_cache, "_capture_decode_steps", lambda rollout, kv_lens: [EagerReplay(rollout, n) for n in kv_lens]
    )
    model = build("qwen3", seed=11)
    graphed = StaticCacheEngine(cuda_graphs=True, done_check_interval=3, prompt_bucket=8, graph_kv_bucket=8)
    eager = StaticCacheEngine()

    def both(prompts, sampling, seed):
        ids, mask = prompts
        args = (sampling, [5, 6], PAD)
        decoder = Decoder(model)
        a = graphed._generate_graphed(decoder, ids, mask, *args, torch.Generator().manual_seed(seed))
        b = eager.generate(model, ids, mask, *args, torch.Generator().manual_seed(seed))
        assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.response_mask, b.response_mask)
        torch.testing.assert_close(a.logp, b.logp, atol=1e-5, rtol=0)
        torch.testing.assert_close(a.sample_logp, b.sample_logp, atol=1e-5, rtol=0)

    sampling = SamplingConfig(max_new_tokens=20, temperature=1.0, top_k=8)
    both(left_padded_prompts([5, 3, 7]), sampling, seed=0)
    state = graphed._graphs
    assert len(state.kv_lens) == 3  # 8 prompt columns + 19 generated: buckets of 16, 24 and 27 columns
    both(left_padded_prompts([2, 6, 4], seed=1), sampling, seed=1)  # same bucket: no new capture
    assert graphed._graphs is state
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(3)  # in place, like an optimiser step
    both(left_padded_prompts([2, 6, 4], seed=1), sampling, seed=1)
    assert graphed._graphs is state
    both(left_padded_prompts([5, 3, 7]), SamplingConfig(max_new_tokens=20, temperature=0), seed=0)
    assert graphed._graphs is not state


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_give_the_eager_engine_tokens():
    model = build("qwen3", seed=10).cuda()
    ids, mask = left_padded_prompts([5, 9, 2, 7], seed=15)
    ids, mask = ids.cuda(), mask.cuda()
    graphed, eager = StaticCacheEngine(cuda_graphs=True, done_check_interval=4), StaticCacheEngine()
    for sampling in (SamplingConfig(max_new_tokens=20, temperature=0), SamplingConfig(max_new_tokens=20, top_k=8)):
        for seed in (0, 1):  # the second call replays the captured graph
            g1, g2 = (torch.Generator(device="cuda").manual_seed(seed) for _ in range(2))
            a = graphed.generate(model, ids, mask, sampling, [3, 4], PAD, g1)
            b = eager.generate(model, ids, mask, sampling, [3, 4], PAD, g2)
            assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.response_mask, b.response_mask)
            torch.testing.assert_close(a.logp, b.logp, atol=1e-4, rtol=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(-1)  # in place: the captured graph must see it
    sampling = SamplingConfig(max_new_tokens=20, temperature=0)
    a = graphed.generate(model, ids, mask, sampling, [3, 4], PAD, torch.Generator(device="cuda"))
    b = eager.generate(model, ids, mask, sampling, [3, 4], PAD, torch.Generator(device="cuda"))
    assert torch.equal(a.response_ids, b.response_ids)


def test_concat_generations_pads_each_part_to_the_longest_response():
    from lit_opd.rollout.generation import concat_generations

    a = Generation(torch.tensor([[5, 6, 7]]), torch.tensor([[True, True, True]]), torch.tensor([[-1.0, -2.0, -3.0]]))
    b = Generation(torch.tensor([[8], [9]]), torch.tensor([[True], [False]]), torch.tensor([[-4.0], [0.0]]))
    out = concat_generations([a, b], pad_token_id=PAD)
    assert out.response_ids.tolist() == [[5, 6, 7], [8, PAD, PAD], [9, PAD, PAD]]
    assert out.response_mask.tolist() == [[True] * 3, [True, False, False], [False] * 3]
    assert out.logp.tolist() == [[-1.0, -2.0, -3.0], [-4.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    assert out.sample_logp is None


@pytest.mark.parametrize("engine", ["static", "hf"])
def test_generate_batch_size_caps_the_rows_per_call_and_keeps_greedy_tokens(engine, tiny_lm, char_tokenizer):
    from lit_opd.logprobs import CausalLMScorer
    from lit_opd.modules import RolloutConfig
    from lit_opd.rollout.collection import RolloutCollector
    from lit_opd.rollout.scoring import ScoringSettings

    prompts = left_padded_prompts([3, 11, 6, 4, 9], seed=2)
    sampling = SamplingConfig(max_new_tokens=12, temperature=0)
    outputs, calls = {}, []
    for size in (0, 2):
        collector = RolloutCollector(RolloutConfig(engine=engine, generate_batch_size=size), char_tokenizer,
                                     build_engine(engine), teacher=None, scoring=ScoringSettings())
        engine_generate = collector.engine.generate
        collector.engine.generate = lambda model, ids, *args: calls.append(len(ids)) or engine_generate(model, ids, *args)
        outputs[size] = collector.generate(CausalLMScorer(tiny_lm), *prompts, sampling, torch.Generator().manual_seed(0))
    assert calls == [5, 2, 2, 1]
    assert torch.equal(outputs[2].response_ids, outputs[0].response_ids)
    assert torch.equal(outputs[2].response_mask, outputs[0].response_mask)
