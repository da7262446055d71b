"""LoRA students with PEFT: adapters injected in place into a HF causal LM, their merged weights
for rollout engines and export, and the PEFT adapter folder.

The adapters are PEFT's (`peft.inject_adapter_in_model`); this module only decides the layout
lit_opd trains with and reads it back:
- the model stays the plain HF class (no `PeftModel` wrapper), so `model.base_model`, its decoder
  layers and `get_output_embeddings()` are where `CausalLMScorer` and `sharding` look for them;
  an adapted linear layer `X` becomes PEFT's `lora.Linear` holding `X.base_layer` (the frozen
  `nn.Linear`), `X.lora_A.default` and `X.lora_B.default`;
- every base parameter is frozen and held in the compute dtype (no float32 master copy); the
  adapters are float32 and are the only trainable parameters;
- engines and exports see merged weights W + (lora_alpha / r)·B·A under the plain HF names,
  computed one tensor at a time and out of place (PEFT's in-place merge/unmerge would round the
  frozen base in its 16-bit dtype on every sync).

Every function here takes the HF model (the scorer's `.model`). Under FSDP2 its tensors are
DTensor shards: the generators gather one tensor at a time (a collective each, so every rank
iterates to the end, in the same order).
"""

import copy
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

ADAPTER = "default"  # PEFT's adapter name; lit_opd trains one adapter
DEFAULT_TARGETS = "all-linear"  # PEFT: every nn.Linear except the output layer (lm_head)


def _refused_target(name: str) -> bool:
    """The scorer applies lm_head.weight itself, and the engines read the embeddings' weight:
    a LoRA layer on either would be bypassed."""
    return "embed" in name or "lm_head" in name


@dataclass
class LoraSettings:
    """Low-rank adapters on the student (PEFT's LoRA; fields named as in `peft.LoraConfig`).

    The base weights are frozen in the student's dtype; only the adapters (float32) are trained.
    The defaults follow "LoRA Without Regret" (Schulman et al., Thinking Machines, 2025): with
    lora_alpha fixed at 32 and the scale lora_alpha / r, the best learning rate hardly depends on
    r, and is ~10x that of full fine-tuning.

    Args:
        r: rank of each adapter (≥ 1).
        lora_alpha: the update B·A is scaled by lora_alpha / r (> 0).
        lora_dropout: must be 0: the first step's behaviour log-probs come from the training forward, so dropout would make them and the drift noise.
        target_modules: modules to adapt: "all-linear" (every linear layer of the decoder, not lm_head), a list of module-name suffixes (e.g. [q_proj, v_proj]) or a regex over full module names; never embeddings or lm_head.
    """

    r: int = 32
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    target_modules: list[str] | str = DEFAULT_TARGETS

    def __post_init__(self):
        if self.r < 1:
            raise ValueError(f"lora.r must be ≥ 1, got {self.r}")
        if not self.lora_alpha > 0:
            raise ValueError(f"lora.lora_alpha must be > 0, got {self.lora_alpha}")
        if self.lora_dropout != 0:
            raise ValueError(
                f"lora.lora_dropout must be 0, got {self.lora_dropout}: the first step's behaviour log-probs "
                "come from the training forward, and dropout would make them and the drift noise"
            )
        names = [self.target_modules] if isinstance(self.target_modules, str) else list(self.target_modules)
        if not names:
            raise ValueError("lora.target_modules is empty: name the modules to adapt, or \"all-linear\"")
        refused = [name for name in names if _refused_target(name)]
        if refused:
            raise ValueError(
                f"lora.target_modules {refused}: embeddings and lm_head cannot be adapted "
                "(the scorer reads lm_head.weight itself, which a LoRA layer would bypass)"
            )

    def peft_config(self) -> LoraConfig:
        """A fresh `peft.LoraConfig` (PEFT expands "all-linear" into the config it is given)."""
        targets = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return LoraConfig(r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules=targets, bias="none")


def is_adapter(name: str) -> bool:
    """Whether a parameter / state-dict name is an adapter weight (`...q_proj.lora_A.default.weight`,
    under any prefix: a LightningModule's `policy.model.` included), i.e. trained and checkpointed."""
    return f".lora_A.{ADAPTER}." in name or f".lora_B.{ADAPTER}." in name


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """{module name: PEFT LoRA layer} of `model`, in module order; empty for a model without LoRA."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(module, LoraLayer) for module in model.modules())


def inject_lora(model: nn.Module, settings: LoraSettings, dtype: torch.dtype) -> nn.Module:
    """Inject `settings`' adapters into the HF causal LM `model` in place and return it (the same
    object, still its HF class).

    Afterwards every base parameter is frozen (requires_grad False) and held in `dtype`; every
    adapter weight (lora_A, lora_B; PEFT's initialisation: A random, B = 0, so the model's
    function is unchanged) is float32 and trainable. Buffers (rotary frequencies) are left as they
    are. Call before sharding. Refused: a model that already has LoRA layers, targets that match
    no module, and any adapted module that is not a linear layer of the decoder.
    """
    if has_lora(model):
        raise ValueError(f"{type(model).__name__} already has LoRA layers: inject_lora once per model")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
        if parameter.is_floating_point() and parameter.dtype != dtype:
            parameter.data = parameter.data.to(dtype)
    try:
        model = inject_adapter_in_model(settings.peft_config(), model, adapter_name=ADAPTER)
    except ValueError as error:  # PEFT: "Target modules ... not found in the base model"
        raise ValueError(f"lora.target_modules {settings.target_modules!r}: {error}") from error
    for name, layer in lora_layers(model).items():
        if _refused_target(name) or not isinstance(layer, LoraLinear) or not isinstance(layer.get_base_layer(), nn.Linear):
            raise ValueError(
                f"lora.target_modules {settings.target_modules!r} adapts {name} ({type(layer.get_base_layer()).__name__}): "
                "only the decoder's linear layers can be adapted, never embeddings or lm_head"
            )
        # PEFT gives the adapters the base layer's dtype; lit_opd trains them in float32.
        layer.lora_A.to(torch.float32)
        layer.lora_B.to(torch.float32)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(is_adapter(name))
    return model


def _full(tensor: Tensor) -> Tensor:
    """The whole tensor of a (possibly FSDP2-sharded) parameter; a collective for a DTensor."""
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach()


def merged_weight(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float) -> Tensor:
    """W + scale·B·A, out of place, rounded once to W's dtype (computed in float32, float64 for
    float64 W). weight: [out, in]; lora_a: [r, in]; lora_b: [out, r]."""
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    delta = lora_b.to(acc) @ lora_a.to(acc)
    return (weight.to(acc) + scale * delta).to(weight.dtype)


def merged_weights(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """(HF name, tensor) of every entry of `model`'s state dict as the plain HF model would have
    it (`model.layers.0.self_attn.q_proj.weight`, tied entries included as `state_dict()` lists
    them): W + scale·B·A for an adapted layer's weight, the tensor itself otherwise; in the base's
    dtype; whole tensors (FSDP2 shards gathered one at a time), detached.

    A generator: one merged tensor exists at a time, so a caller can push each to an engine
    (vLLM's `reload_weights`) or write it, and the model is never copied. For a model without
    LoRA this is `state_dict()` with whole tensors. Every rank must iterate to the end.
    """
    layers = lora_layers(model)
    state = model.state_dict()
    for name, tensor in state.items():
        owner, _, leaf = name.rpartition(".")
        if owner.endswith(f".lora_A.{ADAPTER}") or owner.endswith(f".lora_B.{ADAPTER}"):
            continue
        prefix = owner.removesuffix(".base_layer")
        if owner == prefix or prefix not in layers:
            yield name, _full(tensor)
        elif leaf == "weight":
            weight = _full(tensor)
            lora_a = _full(state[f"{prefix}.lora_A.{ADAPTER}.weight"])
            lora_b = _full(state[f"{prefix}.lora_B.{ADAPTER}.weight"])
            yield f"{prefix}.weight", merged_weight(weight, lora_a, lora_b, layers[prefix].scaling[ADAPTER])
        else:
            yield f"{prefix}.{leaf}", _full(tensor)


def merged_model(model: nn.Module) -> nn.Module:
    """A plain HF model of `model`'s class and config holding its merged weights (`merged_weights`,
    each tensor in the base's dtype, on the base's device), its buffers and generation config: for
    an engine that reads each layer's `.weight` (the static engine; PEFT's layers answer `.weight`
    with the base weight alone) or generates without PEFT's extra matmuls. Frozen, eval mode.
    `copy_merged_weights(model, copy)` refreshes it in place after optimiser steps."""
    cls = type(model)
    if isinstance(model, FSDPModule):  # fully_shard made the class FSDP<cls>(FSDPModule, cls)
        cls = next(base for base in cls.__bases__ if base is not FSDPModule)
    with torch.device("meta"):
        plain = cls(model.config)
    plain.to_empty(device=next(model.parameters()).device)
    plain.tie_weights()  # tied embeddings share one tensor again (a no-op for untied ones)
    for name, tensor in merged_weights(model):
        plain.get_parameter(name).data = tensor.clone()
    for name, buffer in model.named_buffers():  # rotary frequencies: not in the state dict
        owner, _, leaf = name.rpartition(".")
        plain.get_submodule(owner)._buffers[leaf] = buffer.detach().clone()
    plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.requires_grad_(False).eval()


@torch.no_grad()
def copy_merged_weights(model: nn.Module, target: nn.Module) -> None:
    """Copy `model`'s merged weights into the plain model `target` (`merged_model`) in place, so
    that its tensors keep their addresses (the static engine's captured graphs read them)."""
    state = target.state_dict()
    for name, tensor in merged_weights(model):
        state[name].copy_(tensor)


def merged_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """`merged_weights` as a dict (the whole merged model in memory, on the base's device), cast
    to `dtype` if given (None: the base's dtype)."""
    return {name: tensor if dtype is None else tensor.to(dtype) for name, tensor in merged_weights(model)}


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter weights only, whole (FSDP2 shards gathered: every rank calls this), under PEFT's
    names without the adapter name (`model.layers.0.self_attn.q_proj.lora_A.weight`), as
    `peft.get_peft_model_state_dict` gives them and `peft.set_peft_model_state_dict` takes them."""
    state = get_peft_model_state_dict(model, adapter_name=ADAPTER, save_embedding_layers=False)
    return {name: _full(tensor) for name, tensor in state.items()}


def save_adapter(model: nn.Module, settings: LoraSettings, directory: str, is_global_zero: bool = True) -> None:
    """Write the PEFT adapter folder (`adapter_config.json`, `adapter_model.safetensors`, float32)
    that `peft.PeftModel.from_pretrained(base, directory)` loads onto the base model. Under FSDP2
    every rank calls this (the adapters are gathered) and the one with `is_global_zero` writes."""
    state = adapter_state_dict(model)
    if not is_global_zero:
        return
    os.makedirs(directory, exist_ok=True)
    config = settings.peft_config()
    config.base_model_name_or_path = getattr(model.config, "_name_or_path", None) or None
    config.save_pretrained(directory)
    # PeftModel's own state dict names start with its wrappers: base_model (the tuner), .model (ours).
    weights = {f"base_model.model.{name}": tensor.contiguous().cpu() for name, tensor in state.items()}
    save_file(weights, os.path.join(directory, "adapter_model.safetensors"), metadata={"format": "pt"})


def save_merged(model: nn.Module, directory: str, dtype: torch.dtype | None = None, is_global_zero: bool = True) -> None:
    """Write `model` with its adapters merged (`merged_weights`) as a plain HF checkpoint that
    `AutoModelForCausalLM.from_pretrained(directory)` loads, in `dtype` (None: the base's dtype;
    the config records it). The rank with `is_global_zero` gathers the merged model on CPU and
    writes it; under FSDP2 every rank calls this (each tensor is gathered by all)."""
    state = {}
    for name, tensor in merged_weights(model):
        if is_global_zero:
            state[name] = (tensor if dtype is None else tensor.to(dtype)).cpu()
    if not is_global_zero:
        return
    model.save_pretrained(directory, state_dict=state)
    if dtype is not None:
        path = os.path.join(directory, "config.json")
        with open(path) as file:
            config = json.load(file)
        config["dtype"] = str(dtype).removeprefix("torch.")
        with open(path, "w") as file:
            json.dump(config, file, indent=2, sort_keys=True)


# ----------------------------------------------------------------------- in the trainer
def check_lora_sharding(fsdp1: bool) -> None:
    """Refuse LoRA under a sharding strategy that cannot hold it: FSDP1 (`FSDPStrategy`, whose flat
    parameters mix the frozen base and the trainable adapters), and FSDP2 before torch 2.8, which
    refuses a unit whose parameters differ in dtype (the bfloat16 base beside float32 adapters;
    pytorch#154103)."""
    if fsdp1:
        raise ValueError("model.init_args.lora: LoRA students are sharded with FSDP2 (ModelParallelStrategy, "
                         "configs/strategies/fsdp2.yaml), not FSDPStrategy (FSDP1)")
    if tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2]) < (2, 8):
        raise ValueError(f"model.init_args.lora under FSDP2 needs torch ≥ 2.8 (a frozen bfloat16 base beside float32 "
                         f"adapters in one unit), this is torch {torch.__version__}")


def drop_frozen_base_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict post-hook of a LightningModule with a LoRA student at `module.policy`: the frozen
    base is not training state (it is reloaded from model.student), so its checkpoints hold only the
    student's adapter weights."""
    student = prefix + "policy."
    for key in [k for k in state_dict if k.startswith(student) and not is_adapter(k)]:
        del state_dict[key]


def lora_layout(module) -> dict:
    """What a LoRA checkpoint's weights depend on, for the resume layout: the settings (None: full
    fine-tuning) and, with adapters, the base they adapt (its real path where it is a local folder)."""
    settings = getattr(module, "lora", None)
    if settings is None:
        return {"model.init_args.lora": None}
    student = module.student_path
    return {"model.init_args.lora": asdict(settings),
            "model.init_args.student": os.path.realpath(student) if os.path.exists(student) else student}


# Hyperparameters of modules built in Python hold these; checkpoints load with weights_only=True.
torch.serialization.add_safe_globals([LoraSettings])
