"""Where a rollout call spends its time: HF `generate` (dynamic cache) and the fast engine on one
shape of benchmarks/rollout.py, under the PyTorch profiler. Prints one JSON object; per engine:
  wall_s       one generate call without the profiler, best of `repeats`;
  matmul_s     profiled self CPU seconds of aten::mm / addmm / bmm (the weight and attention matmuls
               that are not inside an attention kernel);
  attention_s  profiled self CPU seconds of the ops whose name contains "attention" (SDPA kernels, and
               the engine's C++ attention kernels, which this script wraps in profiler ranges
               "lit_opd::<kernel name>", as it does the engine's other C++ kernels);
  other_s      every other op's profiled self CPU seconds;
  profiled_s   their sum (the profiler adds its own overhead, so it exceeds wall_s);
  kernels_s    the profiled seconds of each of the engine's C++ kernels (included in the above).
and "weight_matmuls_s": the call's weight matmuls alone (the prefill's and every decode step's
projections and MLP, the LM head at the last position; nothing else), best of `repeats`. No engine that
does those matmuls in the model's precision can be faster than that, so "speedup_ceiling" = HF
dynamic's wall_s / weight_matmuls_s bounds every engine's speedup over it. The three timed calls take
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
KERNELS = ("decode_attention", "decode_layer_attention", "add_rms_norm", "silu_mul", "sample_tokens")


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
    matmul = sum(seconds.get(name, 0.0) for name in MATMULS)
    attention = sum(value for name, value in seconds.items() if "attention" in name)
    total = sum(seconds.values())
    return {
        "matmul_s": round(matmul, 3),
        "attention_s": round(attention, 3),
        "other_s": round(total - matmul - attention, 3),
        "profiled_s": round(total, 3),
        "kernels_s": {name: round(seconds[f"lit_opd::{name}"], 3) for name in KERNELS if f"lit_opd::{name}" in seconds},
    }


def weight_matmuls_fn(model, shape: dict):
    """A no-argument callable that does the weight matmuls of one generate call: every layer's q, k, v, o,
    gate, up and down projections on B·P prompt rows and then on B rows per decode step, the LM head on B
    rows each time."""
    B, P, N = shape["batch"], shape["prompt_len"], shape["new_tokens"]
    layers = [
        (
            [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
             layer.mlp.gate_proj, layer.mlp.up_proj],
            layer.mlp.down_proj,
        )
        for layer in model.model.layers
    ]
    dtype, hidden, inner = model.dtype, model.config.hidden_size, model.config.intermediate_size

    def matmuls(rows: int) -> None:
        x, gated = torch.randn(rows, hidden, dtype=dtype), torch.randn(rows, inner, dtype=dtype)
        for projections, down in layers:
            for projection in projections:
                F.linear(x, projection.weight)
            F.linear(gated, down.weight)
        F.linear(x[:B], model.lm_head.weight)

    def call() -> None:
        with torch.no_grad():
            matmuls(B * P)
            for _ in range(N - 1):
                matmuls(B)

    return call


def best_walls(calls: dict, repeats: int) -> dict[str, float]:
    """Best wall seconds of each call over `repeats` rounds in which the calls take turns, after one warm-up
    call each."""
    for call in calls.values():
        call()
    walls = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            walls[name].append(timed(call, "cpu")[0])
    return {name: round(min(values), 3) for name, values in walls.items()}


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
    walls = best_walls({**calls, "weight_matmuls": weight_matmuls_fn(model, shape)}, args.repeats)
    engines = {engine: {"wall_s": walls[engine], **profile_call(calls[engine])} for engine in ENGINES}
    report = {
        "shape": args.shape, "threads": args.threads, "torch": torch.__version__, "engines": engines,
        "weight_matmuls_s": walls["weight_matmuls"],
        "speedup_ceiling": round(walls["hf_dynamic"] / walls["weight_matmuls"], 2),
        "speedup_vs_hf_dynamic": round(walls["hf_dynamic"] / walls["fast"], 2),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
