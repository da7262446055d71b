"""Where a rollout call spends its time: HF `generate` (dynamic cache) and the fast engine on one
shape of benchmarks/rollout.py, under the PyTorch profiler. Prints one JSON object; per engine:
  wall_s       one generate call without the profiler, best of `repeats`;
  matmul_s     profiled self CPU seconds of aten::mm / addmm / bmm (the weight and attention matmuls
               that are not inside an attention kernel) and of the engine's float32 projection kernels
               (linear, gated_mlp: the MLP's SiLU gating included);
  attention_s  profiled self CPU seconds of the ops whose name contains "attention" (SDPA kernels, and
               the engine's C++ attention kernels, which this script wraps in profiler ranges
               "lit_opd::<kernel name>", as it does the engine's other C++ kernels);
  other_s      every other op's profiled self CPU seconds;
  profiled_s   their sum (the profiler adds its own overhead, so it exceeds wall_s);
  kernels_s    the profiled seconds of each of the engine's C++ kernels (included in the above).
and "weight_matmuls_s": the call's weight matmuls alone on PyTorch's matmuls (the prefill's and every
decode step's projections and MLP, the LM head at the last position; nothing else), best of `repeats`.
No engine that does those matmuls with PyTorch can be faster than that, so "speedup_ceiling" = HF
dynamic's wall_s / weight_matmuls_s bounds its speedup over HF. In float32 the engine's decode steps do
them with its own C++ projections: "engine_weight_matmuls_s" and "engine_speedup_ceiling" are the same
for those. How far the matmuls are from the machine's best: "weight_matmul_gflops" (and
"engine_weight_matmul_gflops"), their FLOPs per second, against "square_matmul_gflops" (one
1024 x 1024 x 1024 matmul in the model's dtype). The timed calls take
turns, `repeats` times after one warm-up each, on one model in one process, so that the machine's
changing speed (it is shared) slows them alike; the profiled call comes after.

    python benchmarks/rollout_profile.py --threads 1
    python benchmarks/rollout_profile.py --shape cpu-bf16 --threads 2
"""

import argparse
import json

import torch
import torch.nn.functional as F
from torch.profiler import profile

from lit_opd.rollout import cpu_kernels
from rollout import SHAPES, build, generate_fn, timed

ENGINES = ("hf_dynamic", "fast")
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")
KERNELS = (
    "decode_attention", "decode_layer_attention", "add_rms_norm", "silu_mul", "sample_tokens", "linear", "gated_mlp"
)


def profiled_kernel(name: str):
    """cpu_kernels.<name> inside a profiler range "lit_opd::<name>" (the C++ kernels are no torch ops)."""
    kernel = getattr(cpu_kernels, name)

    def wrapped(*args):
        with torch.profiler.record_function(f"lit_opd::{name}"):
            return kernel(*args)

    return wrapped


def profile_call(call) -> dict:
    """Profiled self CPU seconds of one call, by kind of op."""
    kernels = {name: getattr(cpu_kernels, name) for name in KERNELS}
    for name in KERNELS:
        setattr(cpu_kernels, name, profiled_kernel(name))
    try:
        with profile() as profiler:
            call()
    finally:
        for name, kernel in kernels.items():
            setattr(cpu_kernels, name, kernel)
    seconds = {event.key: event.self_cpu_time_total / 1e6 for event in profiler.key_averages()}
    matmul = sum(seconds.get(name, 0.0) for name in (*MATMULS, "lit_opd::linear", "lit_opd::gated_mlp"))
    attention = sum(value for name, value in seconds.items() if "attention" in name)
    total = sum(seconds.values())
    return {
        "matmul_s": round(matmul, 3),
        "attention_s": round(attention, 3),
        "other_s": round(total - matmul - attention, 3),
        "profiled_s": round(total, 3),
        "kernels_s": {name: round(seconds[f"lit_opd::{name}"], 3) for name in KERNELS if f"lit_opd::{name}" in seconds},
    }


def weight_matmuls_fn(model, shape: dict, engine_kernels: bool = False):
    """A no-argument callable that does the weight matmuls of one generate call, and their FLOPs: every
    layer's q, k, v, o, gate, up and down projections on B·P prompt rows and then on B rows per decode step,
    the LM head on B rows each time. With `engine_kernels` (float32) the decode steps' matmuls go through the
    engine's C++ projections as `_Decoder.decode_cpu` calls them (q, k and v in one call; the MLP, its SiLU
    gating included, in one); otherwise, and for the prefill, through PyTorch's."""
    B, P, N = shape["batch"], shape["prompt_len"], shape["new_tokens"]
    layers = [(layer.self_attn, layer.mlp) for layer in model.model.layers]
    dtype, hidden, inner = model.dtype, model.config.hidden_size, model.config.intermediate_size

    def pytorch_step(rows: int) -> None:
        x, gated = torch.randn(rows, hidden, dtype=dtype), torch.randn(rows, inner, dtype=dtype)
        for attention, mlp in layers:
            for projection in (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj,
                               mlp.gate_proj, mlp.up_proj):
                F.linear(x, projection.weight)
            F.linear(gated, mlp.down_proj.weight)
        F.linear(x[:B], model.lm_head.weight)

    def kernel_step(rows: int) -> None:
        x = torch.randn(rows, hidden, dtype=dtype)
        for attention, mlp in layers:
            cpu_kernels.linear(x, [(attention.q_proj.weight, None), (attention.k_proj.weight, None),
                                   (attention.v_proj.weight, None)])
            cpu_kernels.linear(x, [(attention.o_proj.weight, None)])
            cpu_kernels.gated_mlp(
                x, (mlp.gate_proj.weight, None), (mlp.up_proj.weight, None), (mlp.down_proj.weight, None)
            )
        cpu_kernels.linear(x, [(model.lm_head.weight, None)])

    decode_step = kernel_step if engine_kernels else pytorch_step

    def call() -> None:
        with torch.no_grad():
            pytorch_step(B * P)
            for _ in range(N - 1):
                decode_step(B)

    weights = sum(p.weight.numel() for attention, mlp in layers for p in
                  (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj, mlp.gate_proj,
                   mlp.up_proj, mlp.down_proj))
    flops = 2 * (B * P + B * (N - 1)) * weights + 2 * B * N * model.lm_head.weight.numel()
    return call, flops


def square_matmul_fn(dtype: torch.dtype, size: int = 1024):
    """A no-argument callable that does one [size, size] @ [size, size] matmul, and its FLOPs."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    return (lambda: torch.mm(a, b)), 2 * size**3


def best_walls(calls: dict, repeats: int) -> dict[str, float]:
    """Best wall seconds of each call over `repeats` rounds in which the calls take turns, after one warm-up
    call each."""
    for call in calls.values():
        call()
    walls = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            walls[name].append(timed(call, "cpu")[0])
    return {name: min(values) for name, values in walls.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="cpu", choices=[n for n, s in SHAPES.items() if s["device"] == "cpu"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = SHAPES[args.shape]
    model, ids, mask = build(shape)
    calls = {engine: generate_fn(engine, model, ids, mask, shape["new_tokens"]) for engine in ENGINES}
    weight_matmuls, flops = weight_matmuls_fn(model, shape)
    square_matmul, square_flops = square_matmul_fn(model.dtype)
    timed_calls = {**calls, "weight_matmuls": weight_matmuls, "square_matmul": square_matmul}
    if model.dtype == torch.float32:
        timed_calls["engine_weight_matmuls"] = weight_matmuls_fn(model, shape, engine_kernels=True)[0]
    walls = best_walls(timed_calls, args.repeats)
    engines = {engine: {"wall_s": round(walls[engine], 3), **profile_call(calls[engine])} for engine in ENGINES}
    report = {"shape": args.shape, "threads": args.threads, "torch": torch.__version__, "engines": engines}
    for prefix in ("", "engine_"):
        if f"{prefix}weight_matmuls" in walls:
            seconds = walls[f"{prefix}weight_matmuls"]
            report[f"{prefix}weight_matmuls_s"] = round(seconds, 3)
            report[f"{prefix}speedup_ceiling"] = round(walls["hf_dynamic"] / seconds, 2)
            report[f"{prefix}weight_matmul_gflops"] = round(flops / seconds / 1e9, 1)
    report["square_matmul_gflops"] = round(square_flops / walls["square_matmul"] / 1e9, 1)
    report["speedup_vs_hf_dynamic"] = round(walls["hf_dynamic"] / walls["fast"], 2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
