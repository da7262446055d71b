"""LoRA students (lit_opd.lora): the settings' refusals, in-place injection (HF class kept, base
frozen in the compute dtype, float32 adapters the only trainable weights), merged weights equal to
W + (lora_alpha / r)·B·A, the PEFT adapter folder and the merged HF export round-tripping, and a
few optimiser steps that move the adapters and leave every base weight bit-identical."""

import copy
import os
import socket
from datetime import timedelta
from typing import Optional

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from jsonargparse import ArgumentParser
from peft import PeftModel
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, Qwen3Config

from lit_opd.logprobs import CausalLMScorer
from lit_opd.lora import (
    LoraSettings,
    adapter_state_dict,
    copy_merged_weights,
    has_lora,
    inject_lora,
    is_adapter,
    lora_layers,
    merged_model,
    merged_state_dict,
    merged_weights,
    save_adapter,
    save_merged,
)
from lit_opd.sharding import decoder_layers, shard_scorer

DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_config(tie: bool = False) -> Qwen3Config:
    return Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=tie)


def plain_model(dtype=torch.float64, tie=False, seed=0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(tie), dtype=dtype).eval()


def lora_model(dtype=torch.float64, settings=None, tie=False, adapters_dtype=None, seed=0):
    """A tiny Qwen3 with adapters; B drawn at random (PEFT starts B at 0, which would hide the update);
    `adapters_dtype` recasts the adapters (float64 where logits are compared exactly)."""
    model = inject_lora(plain_model(dtype, tie, seed), settings or LoraSettings(r=4, lora_alpha=8), dtype)
    g = torch.Generator().manual_seed(seed + 1)
    for layer in lora_layers(model).values():
        if adapters_dtype is not None:
            layer.lora_A.to(adapters_dtype)
            layer.lora_B.to(adapters_dtype)
        b = layer.lora_B["default"].weight
        b.data = (0.1 * torch.randn(b.shape, generator=g, dtype=torch.float64)).to(b.dtype)
    return model


def batch(seed=0, rows=3, length=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (rows, length), generator=g)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, :3] = False  # a left-padded prompt
    return ids, mask


# ------------------------------------------------------------------------- settings
@pytest.mark.parametrize("kwargs, key", [
    (dict(r=0), "lora.r"),
    (dict(lora_alpha=0.0), "lora.lora_alpha"),
    (dict(lora_alpha=-8.0), "lora.lora_alpha"),
    (dict(lora_dropout=0.05), "lora.lora_dropout"),
    (dict(target_modules=["q_proj", "lm_head"]), "lora.target_modules"),
    (dict(target_modules=["embed_tokens"]), "lora.target_modules"),
    (dict(target_modules=r"model\.embed_tokens"), "lora.target_modules"),
    (dict(target_modules=[]), "lora.target_modules"),
])
def test_settings_refusals_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")) as error:
        LoraSettings(**kwargs)
    assert "\n" not in str(error.value)


def test_dropout_refusal_says_why():
    with pytest.raises(ValueError, match="behaviour log-probs"):
        LoraSettings(lora_dropout=0.1)


def test_settings_defaults_peft_config_and_checkpoint_loading(tmp_path):
    settings = LoraSettings()
    assert (settings.r, settings.lora_alpha, settings.lora_dropout, settings.target_modules) == (32, 32.0, 0.0, "all-linear")
    config = LoraSettings(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]).peft_config()
    assert (config.r, config.lora_alpha, config.lora_dropout, set(config.target_modules)) == (8, 16, 0.0, {"q_proj", "v_proj"})
    torch.save({"lora": settings}, tmp_path / "h.pt")  # hyperparameters in a checkpoint load with weights_only
    assert torch.load(tmp_path / "h.pt", weights_only=True)["lora"] == settings


def test_settings_from_the_command_line():
    parser = ArgumentParser()
    parser.add_argument("--lora", type=Optional[LoraSettings], default=None)
    assert parser.parse_args([]).lora is None
    cfg = parser.parse_args(["--lora.r", "64"])
    assert parser.instantiate_classes(cfg).lora == LoraSettings(r=64)
    cfg = parser.parse_args(["--lora.r", "8", "--lora.target_modules", "[q_proj, v_proj]"])
    assert parser.instantiate_classes(cfg).lora.target_modules == ["q_proj", "v_proj"]


# ------------------------------------------------------------------------- injection
@pytest.mark.parametrize("tie", [False, True])
def test_injection_in_place_frozen_base_in_dtype_float32_adapters(tie):
    model = plain_model(torch.float32, tie)
    cls, layers = type(model), decoder_layers(model)
    out = inject_lora(model, LoraSettings(r=4, lora_alpha=8), torch.bfloat16)
    assert out is model and type(out) is cls and decoder_layers(out) is layers
    adapted = set(lora_layers(model))
    assert adapted == {f"model.layers.{i}.{block}.{name}" for i in range(2) for name in DECODER_LINEARS
                       for block in (("self_attn",) if name in DECODER_LINEARS[:4] else ("mlp",))}
    assert type(model.get_output_embeddings()) is torch.nn.Linear  # lm_head not adapted
    assert type(model.get_input_embeddings()) is torch.nn.Embedding
    for name, parameter in model.named_parameters():
        adapter = ".lora_A.default." in name or ".lora_B.default." in name
        assert parameter.requires_grad == adapter, name
        assert parameter.dtype == (torch.float32 if adapter else torch.bfloat16), name
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # buffers are left alone
    assert has_lora(model) and not has_lora(plain_model())


def test_injection_refusals():
    model = inject_lora(plain_model(), LoraSettings(r=2), torch.float64)
    with pytest.raises(ValueError, match="already has LoRA"):
        inject_lora(model, LoraSettings(r=2), torch.float64)
    with pytest.raises(ValueError, match=r"lora\.target_modules"):
        inject_lora(plain_model(), LoraSettings(target_modules=["nothing_here"]), torch.float64)
    with pytest.raises(ValueError, match=r"lora\.target_modules .*lm_head"):  # a regex that reaches lm_head
        inject_lora(plain_model(), LoraSettings(target_modules=".*head"), torch.float64)


def test_injected_scorer_equals_plain_model_with_merged_weights():
    model = lora_model(adapters_dtype=torch.float64)
    plain = plain_model()
    plain.load_state_dict(merged_state_dict(model))
    ids, mask = batch()
    got, want = CausalLMScorer(model)(ids, mask, 6), CausalLMScorer(plain)(ids, mask, 6, top_k=3)
    torch.testing.assert_close(got["logp"], want["logp"], rtol=0, atol=1e-12)
    torch.testing.assert_close(model(ids).logits, plain(ids).logits, rtol=0, atol=1e-12)
    # the adapters change the function: the base alone gives other log-probs
    assert (CausalLMScorer(plain_model())(ids, mask, 6)["logp"] - got["logp"]).abs().max() > 1e-3


# ------------------------------------------------------------------------- merged weights
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("tie", [False, True])
def test_merged_weights_are_base_plus_scaled_product(dtype, tie):
    settings = LoraSettings(r=4, lora_alpha=12)
    model = lora_model(dtype, settings, tie)
    state = model.state_dict()
    merged = list(merged_weights(model))
    assert [name for name, _ in merged] == list(plain_model(tie=tie).state_dict())  # HF names, HF order
    for name, tensor in merged:
        assert tensor.dtype == dtype and not tensor.requires_grad
        prefix = name.removesuffix(".weight")
        if prefix not in lora_layers(model):
            assert torch.equal(tensor, state[name]), name
            continue
        w = state[f"{prefix}.base_layer.weight"].double()
        a, b = state[f"{prefix}.lora_A.default.weight"].double(), state[f"{prefix}.lora_B.default.weight"].double()
        exact = w + 3.0 * (b @ a)  # lora_alpha / r = 12 / 4
        assert (b != 0).all() and (exact != w).any()
        if dtype == torch.float64:
            torch.testing.assert_close(tensor, exact, rtol=1e-15, atol=1e-15)
        else:  # rounded once to bfloat16: within half a unit in the last place (8 significant bits)
            assert ((tensor.double() - exact).abs() <= exact.abs() * 2.0**-8 + 1e-30).all(), name
    for name, tensor in model.state_dict().items():  # out of place: the model is unchanged
        assert torch.equal(tensor, state[name])


def test_merged_weights_of_a_plain_model_are_its_state_dict():
    model = plain_model()
    assert all(torch.equal(t, model.state_dict()[n]) for n, t in merged_weights(model))
    assert list(dict(merged_weights(model))) == list(model.state_dict())


# ------------------------------------------------------------------------- export
def test_adapter_state_dict_has_peft_names_and_only_adapters():
    model = lora_model(torch.bfloat16)
    state = adapter_state_dict(model)
    assert set(state) == {f"{name}.lora_{ab}.weight" for name in lora_layers(model) for ab in "AB"}
    assert {n for n, _ in model.named_parameters() if is_adapter(n)} == {n.replace(".weight", ".default.weight") for n in state}
    assert all(t.dtype == torch.float32 for t in state.values())


def test_peft_adapter_folder_round_trips(tmp_path):
    settings = LoraSettings(r=4, lora_alpha=8)
    model = lora_model(settings=settings, adapters_dtype=torch.float64)
    save_adapter(model, settings, str(tmp_path / "adapter"))
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    peft_model = PeftModel.from_pretrained(plain_model(), str(tmp_path / "adapter"), autocast_adapter_dtype=False).eval()
    ids, _ = batch(1)
    torch.testing.assert_close(peft_model(input_ids=ids).logits, model(ids).logits, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype, export, tie", [(torch.float64, None, False), (torch.bfloat16, None, True),
                                               (torch.bfloat16, torch.float32, False)])
def test_merged_export_round_trips(tmp_path, dtype, export, tie):
    model = lora_model(dtype, tie=tie, adapters_dtype=torch.float64 if dtype == torch.float64 else None)
    save_merged(model, str(tmp_path / "merged"), export)
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype="auto").eval()
    assert type(loaded) is type(model) and not has_lora(loaded)
    expected = merged_state_dict(model, export)
    assert loaded.config.dtype == (export or dtype)
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tie
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    if dtype == torch.float64:
        ids, _ = batch(2)
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------- training
def test_optimiser_steps_move_adapters_and_leave_the_base_bit_identical():
    model = inject_lora(plain_model(torch.float32).train(), LoraSettings(r=4, lora_alpha=8), torch.bfloat16)
    scorer = CausalLMScorer(model)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainable = [p for p in scorer.parameters() if p.requires_grad]
    assert len(trainable) == len(adapters) == 2 * 7 * 2
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    for step in range(4):
        ids, mask = batch(10 + step)
        loss = -scorer(ids, mask, 6)["logp"].mean()
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is None for n, p in model.named_parameters() if n in base)
        optimizer.step()
    for name, parameter in model.named_parameters():
        if name in base:
            assert parameter.dtype == torch.bfloat16 and torch.equal(parameter, base[name]), name
        else:
            assert parameter.dtype == torch.float32 and not torch.equal(parameter, adapters[name]), name


@pytest.mark.parametrize("tie", [False, True])
def test_merged_model_is_a_plain_copy_refreshed_in_place(tie):
    model = lora_model(tie=tie, adapters_dtype=torch.float64)
    plain = merged_model(model)
    assert type(plain) is type(model) and not has_lora(plain) and not plain.training
    assert (plain.lm_head.weight is plain.model.embed_tokens.weight) == tie
    assert all(not p.requires_grad for p in plain.parameters())
    ids, mask = batch(3)
    torch.testing.assert_close(plain(ids).logits, model(ids).logits, rtol=0, atol=1e-12)
    addresses = [p.data_ptr() for p in plain.parameters()]
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B["default"].weight.mul_(-2.0)
    copy_merged_weights(model, plain)
    assert [p.data_ptr() for p in plain.parameters()] == addresses
    torch.testing.assert_close(plain(ids).logits, model(ids).logits, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------- FSDP2
def sharded_worker(rank: int, world: int, port: int) -> None:
    """One of two gloo ranks: the LoRA student sharded by `shard_scorer` (each decoder layer one
    FSDP2 unit holding the frozen bfloat16 base and the float32 adapters) takes 3 AdamW steps on
    its half of each batch; rank 0 repeats them unsharded, the halves as two micro-batches.
    Compared: the adapters' updates, the base (bit-identical), and what the gathering functions
    (merged_weights, adapter_state_dict, merged_model) give under sharding."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        model = lora_model(torch.bfloat16).train()
        scorer, reference = CausalLMScorer(model), CausalLMScorer(copy.deepcopy(model))
        base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        shard_scorer(scorer, init_device_mesh("cpu", (world,)), MixedPrecisionPolicy())
        batches = [batch(20 + step, rows=4) for step in range(3)]

        def fit(s, parts):  # each part: a forward over two rows, weighted 1 / len(parts)
            optimizer = torch.optim.AdamW([p for p in s.parameters() if p.requires_grad], lr=1e-2)
            for ids, mask in batches:
                optimizer.zero_grad()
                for rows in parts:
                    (-s(ids[rows], mask[rows], 6)["logp"].mean() / len(parts)).backward()
                optimizer.step()

        fit(scorer, [slice(2 * rank, 2 * rank + 2)])  # FSDP2 averages the two ranks' gradients
        merged, adapters, plain = dict(merged_weights(model)), adapter_state_dict(model), merged_model(model)
        whole = {n: p.full_tensor() for n, p in model.named_parameters()}
        if rank == 0:
            # the same forwards (two rows each: bfloat16 activations depend on the batch's shape) in one process
            fit(reference, [slice(0, 2), slice(2, 4)])
            for name, parameter in reference.model.named_parameters():
                if name in base:
                    assert torch.equal(whole[name], base[name]), name
                else:  # the updates agree in norm (float32 sums in another order)
                    update, expected = whole[name] - start[name], parameter.detach() - start[name]
                    assert (update - expected).norm() <= 1e-4 * expected.norm(), (name, ((update - expected).norm() / expected.norm()).item())
            for name, tensor in merged_weights(reference.model):
                assert merged[name].dtype == tensor.dtype == torch.bfloat16
                assert torch.equal(plain.state_dict()[name], merged[name]), name
            assert adapters.keys() == adapter_state_dict(reference.model).keys()
            assert all(not isinstance(t, DTensor) for t in (*merged.values(), *adapters.values()))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(torch.__version__ < "2.8", reason="FSDP2 before torch 2.8 refuses a unit whose parameters have two dtypes")
def test_sharded_lora_student_equals_one_process():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(sharded_worker, args=(2, port), nprocs=2, join=True)
