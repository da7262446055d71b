"""LoRA students in training (`model.init_args.lora`): every variant trains the adapters only and
leaves the frozen base bit-identical; rollouts follow the adapters (greedy = PEFT's continuation);
checkpoints hold the adapters only and resume exactly; another base or rank is refused; the
export is the merged model with the PEFT adapter folder beside it."""

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
import lightning as L
from peft import PeftModel
from transformers import AutoModelForCausalLM

from helpers_cli import OVERRIDES, tiny_args
from lit_opd.checkpointing import AtomicCheckpointIO
from lit_opd.data.prompts import PromptDataModule
from lit_opd.gates import DriftGate
from lit_opd.lightning_cli import fit_run
from lit_opd.lora import LoraSettings, inject_lora, is_adapter, lora_layers
from lit_opd.modules import OptimConfig, RolloutConfig, SampledTokenOPD
from lit_opd.rollout.engine import SamplingConfig
from lit_opd.rollout.factory import build_engine
from lit_opd.tiny import tiny_qwen3

LORA = ["--model.init_args.lora.r=4", "--model.init_args.lora.lora_alpha=8"]


def base_weights(student) -> dict[str, torch.Tensor]:
    """The frozen base of a LoRA student under the plain HF names (`q_proj.base_layer.weight` →
    `q_proj.weight`)."""
    return {name.replace(".base_layer.", "."): tensor for name, tensor in student.state_dict().items()
            if not is_adapter(name)}


# ------------------------------------------------------------------------- every variant
@pytest.mark.slow
@pytest.mark.parametrize("config, extra", [
    ("opd", []),
    ("opd_block64", ["--model.init_args.gates.init_args.block_size=4"]),  # with a drift gate
    ("topk_lsm", []),
    ("gkd", []),
    ("sg_opd", []),
    ("opd_lora", []),
], ids=["opd", "opd_block64", "topk_lsm", "gkd", "sg_opd", "opd_lora"])
def test_a_lora_fit_moves_the_adapters_only(config, extra, tiny_checkpoints, prompts_file, tmp_path, monkeypatch):
    """4 optimiser steps (the two reuse epochs of one rollout batch): every base weight is bit-identical
    to the checkpoint's, every lora_B (PEFT starts it at 0) has moved, and the optimiser holds the
    adapters and nothing else."""
    monkeypatch.chdir(tmp_path)
    lora = [] if config == "opd_lora" else LORA
    cli = fit_run([config, OVERRIDES], [*tiny_args(tiny_checkpoints, prompts_file), *lora, *extra,
                                        "--trainer.max_steps=4", "--model.init_args.optim.lr=1e-2"])
    assert cli.trainer.global_step == 4
    student = cli.model.student
    before = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["student"]).state_dict()
    after = base_weights(student)
    assert after.keys() == before.keys()
    for name, weight in before.items():
        assert torch.equal(after[name], weight), name
    layers = lora_layers(student)
    assert len(layers) == 2 * 7  # every linear layer of the decoder
    for name, layer in layers.items():
        assert layer.lora_B["default"].weight.abs().sum() > 0, f"{name}.lora_B did not move"
    trained = {id(p) for group in cli.model.optimizers().optimizer.param_groups for p in group["params"]}
    adapters = {id(p) for name, p in student.named_parameters() if is_adapter(name)}
    assert trained == adapters and all(p.dtype == torch.float32 for n, p in student.named_parameters() if is_adapter(n))


# ----------------------------------------------------------------------------- rollouts
def peft_greedy(model, ids, mask, steps):
    """PEFT's greedy continuation: HF generate through the model's LoRA layers."""
    out = model.generate(input_ids=ids, attention_mask=mask.long(), do_sample=False, max_new_tokens=steps,
                         eos_token_id=[], pad_token_id=0)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("engine_name", ["static", "hf"])
def test_greedy_rollouts_after_a_sync_equal_peft(engine_name, char_tokenizer):
    """The student's rollout engine, before and after an optimiser step moves the adapters, gives
    the greedy continuation of the PEFT model (float64, so that no near-tie decides)."""
    model = inject_lora(tiny_qwen3(char_tokenizer, hidden_size=32, num_layers=2, seed=0).to(torch.float64),
                        LoraSettings(r=4, lora_alpha=8), torch.float64)
    for layer in lora_layers(model).values():
        layer.lora_A.to(torch.float64)
        layer.lora_B.to(torch.float64)
    engine = build_engine(engine_name, lora=True)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, len(char_tokenizer), (3, 6), generator=g)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, :2] = False
    sampling = SamplingConfig(max_new_tokens=12, temperature=0)
    plain = tiny_qwen3(char_tokenizer, hidden_size=32, num_layers=2, seed=0).to(torch.float64).eval()
    outputs = []
    for step in range(2):
        model.eval()
        with torch.no_grad():
            rollout = engine.generate(model, ids, mask, sampling, [], 0, torch.Generator().manual_seed(1))
            expected = peft_greedy(model, ids, mask, sampling.max_new_tokens)
        assert torch.equal(rollout.response_ids, expected), f"step {step}"
        outputs.append(expected)
        with torch.no_grad():  # a step in place, as an optimiser's (lora_B starts at 0)
            for layer in lora_layers(model).values():
                b = layer.lora_B["default"].weight
                b.add_(0.5 * torch.randn(b.shape, generator=g, dtype=b.dtype))
    with torch.no_grad():
        untrained = plain.generate(input_ids=ids, attention_mask=mask.long(), do_sample=False, max_new_tokens=12,
                                   eos_token_id=[], pad_token_id=0)[:, ids.shape[1]:]
    assert torch.equal(outputs[0], untrained)  # B = 0: the adapters change nothing yet
    assert not torch.equal(outputs[1], untrained), "the step did not change the greedy rollouts: the test shows nothing"


# ------------------------------------------------------------------- checkpoints, resume
class Losses(L.Callback):
    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append((trainer.global_step, batch["rollout_index"], batch["reuse_index"], float(outputs["loss"])))


def lora_fit(checkpoints, prompts, out, max_steps, ckpt_path=None, r=4):
    """SampledTokenOPD with rank-r adapters and a Block gate, reuse 2 × 2 mini-batches (a rollout batch
    is 4 optimiser steps), a checkpoint after every step: (losses per step, final checkpoint)."""
    module = SampledTokenOPD(student=checkpoints["student"], teacher=checkpoints["teacher"], dtype="float32",
                             rollout=RolloutConfig(num_samples=2, max_new_tokens=8), optim=OptimConfig(lr=1e-2),
                             gates=[DriftGate(block_size=4)], lora=LoraSettings(r=r, lora_alpha=8))
    data = PromptDataModule(checkpoints["student"], prompts, instruction="", prompt_field="problem",
                            max_prompts=4, prompts_per_rollout=2, reuse=2, num_minibatches=2)
    losses = Losses()
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, deterministic=True,
                        plugins=[AtomicCheckpointIO()],
                        callbacks=[losses, ModelCheckpoint(dirpath=out, every_n_train_steps=1, save_top_k=-1,
                                                           save_last=True)])
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return losses.rows, torch.load(out / "last.ckpt", weights_only=False), module


@pytest.fixture(scope="module")
def straight_lora_run(tiny_checkpoints, prompts_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight_lora")
    return *lora_fit(tiny_checkpoints, prompts_file, out, max_steps=6), out


@pytest.mark.slow
def test_last_ckpt_holds_the_adapters_only(straight_lora_run):
    """The model weights of a LoRA run's last.ckpt are the student's adapter weights, all of them,
    and nothing else (no frozen base, no teacher); Adam's state is theirs; the layout records the
    base and the LoRA settings."""
    _, last, module, _ = straight_lora_run
    adapters = {f"policy.model.{name}" for name, _ in module.student.named_parameters() if is_adapter(name)}
    assert set(last["state_dict"]) == adapters and len(adapters) == 2 * 7 * 2
    assert len(last["optimizer_states"][0]["state"]) == len(adapters)
    layout = last["lit_opd"]["layout"]
    assert layout["model.init_args.lora"] == {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
                                              "target_modules": "all-linear"}
    assert "model.init_args.student" in layout


@pytest.mark.slow
def test_resume_mid_reuse_is_exact(straight_lora_run, tiny_checkpoints, prompts_file, tmp_path):
    """Resumed from the checkpoint of step 3 (the second reuse epoch of rollout batch 0): the later
    steps' losses, the final adapters and Adam's moments equal the uninterrupted run's, bit for bit."""
    rows, last, _, out = straight_lora_run
    [path] = out.glob("*step=3.ckpt")
    resumed_rows, resumed, _ = lora_fit(tiny_checkpoints, prompts_file, tmp_path, max_steps=6, ckpt_path=path)
    assert rows[2][:3] == (3, 0, 1)
    assert resumed_rows == rows[3:]
    assert resumed["state_dict"].keys() == last["state_dict"].keys()
    for name, weight in last["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], weight), name
    for a, b in zip(last["optimizer_states"][0]["state"].values(), resumed["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.slow
def test_resume_with_another_rank_is_refused(straight_lora_run, tiny_checkpoints, prompts_file, tmp_path):
    _, _, _, out = straight_lora_run
    with pytest.raises(ValueError, match=r"cannot resume from .*model.init_args.lora is \{'r': 8"):
        lora_fit(tiny_checkpoints, prompts_file, tmp_path, max_steps=6, ckpt_path=out / "last.ckpt", r=8)


# ------------------------------------------------------------------------------- export
def test_export_is_the_merged_model_with_the_adapter_folder_beside(tiny_checkpoints, tmp_path):
    """`save_student_pretrained` of a bfloat16 LoRA student: a plain HF checkpoint whose adapted weights
    are W + (lora_alpha / r)·B·A to bfloat16's rounding, the others the base's, in bfloat16; the PEFT
    adapter folder in `adapter/` loads onto the base and gives the student's logits."""
    module = SampledTokenOPD(student=tiny_checkpoints["student"], teacher=tiny_checkpoints["teacher"],
                             dtype="bfloat16", lora=LoraSettings(r=4, lora_alpha=8))
    module.configure_model()
    student = module.student
    g = torch.Generator().manual_seed(0)
    for layer in lora_layers(student).values():
        b = layer.lora_B["default"].weight
        b.data = 0.1 * torch.randn(b.shape, generator=g)
    module.save_student_pretrained(str(tmp_path / "final"))

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert merged.dtype == torch.bfloat16 and (tmp_path / "final" / "tokenizer_config.json").is_file()
    base = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["student"], dtype=torch.bfloat16).state_dict()
    layers = lora_layers(student)
    for name, weight in merged.state_dict().items():
        prefix = name.removesuffix(".weight")
        if prefix in layers:
            a, b = layers[prefix].lora_A["default"].weight, layers[prefix].lora_B["default"].weight
            exact = base[name].double() + 2.0 * (b.double() @ a.double())
            torch.testing.assert_close(weight.double(), exact, rtol=2**-8, atol=0, msg=name)  # bfloat16's rounding
        else:
            assert torch.equal(weight, base[name]), name

    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_checkpoints["student"],
                                                                             dtype=torch.bfloat16),
                                        str(tmp_path / "final" / "adapter"))
    ids = torch.randint(3, 60, (2, 10), generator=g)
    student.eval()
    with torch.no_grad():
        torch.testing.assert_close(adapted(input_ids=ids).logits, student(input_ids=ids).logits)


# ------------------------------------------------------------------------------ sharding
@pytest.mark.slow
def test_fsdp2_two_processes_equal_one_with_lora(tmp_path_factory, tiny_checkpoints, write_prompts):
    """opd_block64 with rank-4 adapters, 2 steps (the second reuses the rollout batch): 2 gloo
    processes under FSDP2 give the losses, adapter gradients and weights of 1 process, leave the
    base untouched, and export the merged student with its adapter folder."""
    from test_fsdp import BLOCK_GATE, assert_same_tensors, initial_weights, losses, run

    prompts = write_prompts(range(10, 34), lambda i: f"{i}+{i + 1}=?", lambda i: 2 * i + 1)  # one length
    args = ("opd_block64", tiny_checkpoints, prompts)
    extra = (f"--model.init_args.gates={BLOCK_GATE}", *LORA)
    single = run(tmp_path_factory, "lora_1", *args, 1, [1, 2], 2, *extra)
    sharded = run(tmp_path_factory, "lora_2", *args, 2, [1, 2], 2, *extra, export=True)
    torch.testing.assert_close(losses(sharded), losses(single), rtol=1e-5, atol=0)
    for step in (1, 2):
        grads = torch.load(sharded / f"grads_{step}.pt"), torch.load(single / f"grads_{step}.pt")
        assert grads[1] and all(is_adapter(name) for name in grads[1])  # only adapters have gradients
        assert_same_tensors(*grads, rtol=2e-5)
    weights = torch.load(sharded / "weights_2.pt"), torch.load(single / "weights_2.pt")
    assert_same_tensors({k: v for k, v in weights[0].items() if is_adapter(k)},
                        {k: v for k, v in weights[1].items() if is_adapter(k)}, rtol=1e-4)
    base = initial_weights(tiny_checkpoints)
    for name, value in weights[0].items():
        if not is_adapter(name):
            assert torch.equal(value, base[name.replace(".base_layer.", ".")]), name
    assert AutoModelForCausalLM.from_pretrained(sharded / "export").state_dict().keys() == base.keys()
    assert (sharded / "export" / "adapter" / "adapter_model.safetensors").is_file()


def test_sharding_that_cannot_hold_lora_is_refused_in_one_line(monkeypatch):
    from lit_opd.lora import check_lora_sharding

    with pytest.raises(ValueError, match="not FSDPStrategy") as error:
        check_lora_sharding(fsdp1=True)
    assert "\n" not in str(error.value)
    check_lora_sharding(fsdp1=False)  # this torch (≥ 2.8)
    monkeypatch.setattr(torch, "__version__", "2.7.1+cu126")
    with pytest.raises(ValueError, match=r"needs torch ≥ 2.8 .* this is torch 2.7.1\+cu126"):
        check_lora_sharding(fsdp1=False)
