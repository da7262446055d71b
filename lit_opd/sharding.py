"""Sharding the OPD modules: FSDP2 (`fully_shard`, under Lightning's `ModelParallelStrategy`) or
FSDP1 (under `FSDPStrategy`) of a scorer, gathering it for rollouts, exporting the student as a
plain HF checkpoint.

Layout of a sharded `CausalLMScorer`: each decoder layer is one FSDP unit (gathered for its own
forward and backward), the scorer is the root unit (embeddings, final norm, lm_head), so every
forward through the scorer gathers the root around the whole log-prob computation.

Rollouts gather the whole model once (`gathered`) instead of layer by layer per token: the
static-KV-cache engine reads the gathered weights and runs no collective, so each rank stops generating when its
own rows are done (HF `generate`, the fallback, keeps the ranks in step itself: transformers
turns on `synced_gpus` for FSDP-managed models). The price is one full copy of the model per
rank while generating.
"""

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.fsdp import (
    FSDPModule,
    FullyShardedDataParallel,
    MixedPrecisionPolicy,
    fully_shard,
    register_fsdp_forward_method,
)
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

MIXED_PRECISION_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def fsdp_mesh(device_mesh: DeviceMesh) -> DeviceMesh:
    """The mesh to shard parameters over. lit_opd has no tensor parallelism: every rank is a
    data-parallel rank. A 1-D mesh is used as it is. Of Lightning's 2-D (data_parallel,
    tensor_parallel) mesh a dimension of size 1 is dropped, so both the default layout of one
    node, (1, devices), and (ranks, 1) shard over all ranks; with both sizes > 1 (the default
    on several nodes: (nodes, devices)) parameters are sharded within `tensor_parallel` and
    replicated across `data_parallel` (HSDP)."""
    if device_mesh.ndim == 1:
        return device_mesh
    if device_mesh.ndim != 2:
        raise ValueError(f"expected a 1-D or 2-D device mesh, got {device_mesh.ndim} dimensions")
    names = device_mesh.mesh_dim_names or ("data_parallel", "tensor_parallel")
    replicate, shard = device_mesh.shape
    if replicate == 1:
        return device_mesh[names[1]]
    if shard == 1:
        return device_mesh[names[0]]
    return device_mesh


def mixed_precision_policy(precision: str) -> MixedPrecisionPolicy:
    """FSDP2 mixed precision for Lightning's `trainer.precision`: "bf16-mixed" / "16-mixed"
    gather the parameters in bfloat16 / float16 for compute and reduce gradients in float32;
    every other setting computes and reduces in the parameters' own dtype."""
    dtype = MIXED_PRECISION_DTYPES.get(str(precision))
    if dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a HF causal LM (`model.model.layers` for Llama / Qwen)."""
    layers = getattr(model.base_model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: no decoder layers at base_model.layers to shard")
    return layers


def shard_scorer(scorer: nn.Module, mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy) -> None:
    """`fully_shard` each decoder layer of `scorer.model`, then `scorer` as the root unit.

    `response_hidden` is registered as a forward of the root as well, so that a caller that
    needs the hidden states and the lm_head weight apart (GKD) also finds the root gathered."""
    for layer in decoder_layers(scorer.model):
        fully_shard(layer, mesh=mesh, mp_policy=mp_policy)
    fully_shard(scorer, mesh=mesh, mp_policy=mp_policy)
    register_fsdp_forward_method(scorer, "response_hidden")


def wrap_scorer_fsdp1(scorer: nn.Module, strategy) -> FullyShardedDataParallel:
    """FSDP1 (Lightning's `FSDPStrategy`): `scorer` wrapped as its own root, each decoder layer a
    unit (the strategy's auto_wrap_policy if it names one, else the decoder-layer class), with the
    strategy's sharding strategy, mixed precision, CPU offload and FSDP arguments. Lightning then
    leaves the LightningModule itself unwrapped, so the scorer is the root unit, as under FSDP2."""
    kwargs = dict(strategy.kwargs)
    kwargs.setdefault("auto_wrap_policy", ModuleWrapPolicy({type(decoder_layers(scorer.model)[0])}))
    return FullyShardedDataParallel(
        scorer,
        sharding_strategy=strategy.sharding_strategy,
        mixed_precision=strategy.mixed_precision_config,
        cpu_offload=strategy.cpu_offload,
        device_id=strategy.root_device,
        **kwargs,
    )


def place_scorer(module, scorer: nn.Module, shard: bool = True) -> nn.Module:
    """`scorer` laid out for the strategy of the LightningModule `module`'s trainer: FSDP2
    (`ModelParallelStrategy`): `shard_scorer` on its device mesh, mixed precision from
    trainer.precision; FSDP1 (`FSDPStrategy`): `wrap_scorer_fsdp1` with the strategy's settings.
    With shard=False it stays whole on every rank (moved to the device under FSDP1, which moves no
    module itself). Returns the scorer: FSDP1 wraps, FSDP2 shards in place."""
    strategy = module.trainer.strategy
    if isinstance(strategy, FSDPStrategy):
        return wrap_scorer_fsdp1(scorer, strategy) if shard else scorer.to(strategy.root_device)
    if shard:
        shard_scorer(scorer, fsdp_mesh(module.device_mesh), mixed_precision_policy(module.trainer.precision))
    return scorer


def clip_gradient_norm(module, scorer: nn.Module, optimizer, max_norm: float) -> None:
    """Clip `scorer`'s gradients to global norm `max_norm`: under FSDP1 the wrapped scorer's
    `clip_grad_norm_` (the norm of all shards, which Lightning's FSDP precision plugin does not
    do); otherwise the LightningModule `module`'s `clip_gradients`."""
    if isinstance(scorer, FullyShardedDataParallel):
        scorer.clip_grad_norm_(max_norm)
    else:
        module.clip_gradients(optimizer, max_norm, "norm")


@contextmanager
def gradient_sync(scorer: nn.Module, enabled: bool):
    """The body's backward reduces gradients across ranks only if `enabled` (the last micro-batch of
    an optimiser step); before it they accumulate locally: FSDP2 `set_requires_gradient_sync`,
    FSDP1 `no_sync`. A no-op for a module that is not sharded."""
    if isinstance(scorer, FSDPModule):
        scorer.set_requires_gradient_sync(enabled)
        yield
    elif isinstance(scorer, FullyShardedDataParallel) and not enabled:
        with scorer.no_sync():
            yield
    else:
        yield


def is_sharded(module: nn.Module) -> bool:
    return isinstance(module, (FSDPModule, FullyShardedDataParallel))


def full_tensors(model: nn.Module):
    """(name, whole tensor) of each entry of `model`'s state dict, a sharded one (FSDP2's DTensor)
    gathered one at a time, so that no rank ever holds a whole copy of the model beside its shard.
    A collective per sharded tensor: every rank iterates to the end, in the same order."""
    for name, tensor in model.state_dict().items():
        yield name, (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach()


@contextmanager
def gathered(root: nn.Module):
    """Every FSDP unit under `root` all-gathered for the body (plain tensors: the full model on
    every rank) and resharded after; a no-op for a module that is not sharded.

    Inside, the decoder layers keep their parameters gathered after a forward, so forwards
    all-gather nothing. Every rank must enter together: the all-gathers are collectives, made
    in the same order on every rank.
    """
    if not is_sharded(root):
        yield
        return
    if isinstance(root, FullyShardedDataParallel):
        with FullyShardedDataParallel.summon_full_params(root, writeback=False):
            yield
        return
    # FSDP2 makes the first unit to run forward the root; HF generate runs the layers' forwards
    # outside the scorer's, so the scorer is made the root first (a no-op after its first forward).
    root._get_fsdp_state()._lazy_init()
    layers = [m for m in root.modules() if isinstance(m, FSDPModule) and m is not root]
    for layer in layers:
        layer.set_reshard_after_forward(False, recurse=False)
    for unit in (root, *layers):
        unit.unshard()
    try:
        yield
    finally:
        for layer in layers:
            layer.reshard()
            layer.set_reshard_after_forward(True, recurse=False)
        root.reshard()


def save_pretrained_full(scorer: nn.Module, tokenizer, path: str, is_global_zero: bool,
                         dtype: torch.dtype | None = None) -> None:
    """Write the HF model `scorer.model` (sharded by FSDP2 or FSDP1, or not) and `tokenizer` to
    `path` as a plain HF checkpoint (`from_pretrained` loads it), its floating-point weights in
    `dtype` (None: as they are; config.json says which). The full state dict is gathered to CPU on
    rank 0 (a collective under sharding: every rank calls this); rank 0 writes."""
    # Offloading to CPU is for accelerators only (FSDP1 crashes when asked to on CPU processes).
    on_accelerator = next(scorer.parameters()).device.type != "cpu"
    state_dict = get_model_state_dict(scorer, options=StateDictOptions(full_state_dict=True, cpu_offload=on_accelerator))
    if is_global_zero:
        weights = {name.removeprefix("model."): value for name, value in state_dict.items()}
        if dtype is not None:
            weights = {name: value.to(dtype) if value.is_floating_point() else value for name, value in weights.items()}
        scorer.model.save_pretrained(path, state_dict=weights)
        if dtype is not None:  # save_pretrained writes the dtype of the module's own (master) parameters
            config = Path(path) / "config.json"
            config.write_text(json.dumps(json.loads(config.read_text()) | {"dtype": str(dtype).removeprefix("torch.")},
                                         indent=2, sort_keys=True) + "\n")
        tokenizer.save_pretrained(path)
