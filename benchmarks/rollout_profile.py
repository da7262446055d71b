"""Where a rollout call spends its time: HF `generate` (dynamic cache) and the static-KV-cache engine on
one shape of benchmarks/rollout.py, under the PyTorch profiler. Prints one JSON object; per engine:
  wall_s       one generate call without the profiler, best of `repeats`;
  matmul_s     profiled self CPU seconds of aten::mm / addmm / bmm (the weight matmuls and the attention
               matmuls that are not inside scaled_dot_product_attention);
  attention_s  profiled self CPU seconds of the ops whose name contains "attention" (scaled_dot_product_attention);
  other_s      every other op's profiled self CPU seconds;
  profiled_s   their sum (the profiler adds its own overhead, so it exceeds wall_s).
and "weight_matmuls_s": the call's weight matmuls alone (the prefill's and every decode step's projections
and MLP, the LM head at the last position; nothing else), best of `repeats`. No engine that does those
matmuls with PyTorch can be faster than that, so "speedup_ceiling" = HF dynamic's wall_s / weight_matmuls_s
bounds its speedup over HF. How far the matmuls are from the machine's best: "weight_matmul_gflops", their
FLOPs per second, against "square_matmul_gflops" (one 1024 x 1024 x 1024 matmul in the model's dtype). The
timed calls take turns, `repeats` times after one warm-up each, on one model in one process, so that the
machine's changing speed (it is shared) slows them alike; the profiled call comes after.

    python benchmarks/rollout_profile.py --threads 1
    python benchmarks/rollout_profile.py --shape cpu-bf16 --threads 2
"""

import argparse
import json

import torch
import torch.nn.functional as F
from torch.profiler import profile

from rollout import SHAPES, build, generate_fn, timed

ENGINES = ("hf_dynamic", "static")
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")


def profile_call(call) -> dict:
    """Profiled self CPU seconds of one call, by kind of op."""
    with profile() as profiler:
        call()
    seconds = {event.key: event.self_cpu_time_total / 1e6 for event in profiler.key_averages()}
    matmul = sum(seconds.get(name, 0.0) for name in MATMULS)
    attention = sum(value for name, value in seconds.items() if "attention" in name)
    total = sum(seconds.values())
    return {
        "matmul_s": round(matmul, 3),
        "attention_s": round(attention, 3),
        "other_s": round(total - matmul - attention, 3),
        "profiled_s": round(total, 3),
    }


def weight_matmuls_fn(model, shape: dict):
    """A no-argument callable that does the weight matmuls of one generate call, and their FLOPs: every
    layer's q, k, v, o, gate, up and down projections on B·P prompt rows and then on B rows per decode step,
    the LM head on B rows each time."""
    B, P, N = shape["batch"], shape["prompt_len"], shape["new_tokens"]
    layers = [(layer.self_attn, layer.mlp) for layer in model.model.layers]
    dtype, hidden, inner = model.dtype, model.config.hidden_size, model.config.intermediate_size

    def step(rows: int) -> None:
        x, gated = torch.randn(rows, hidden, dtype=dtype), torch.randn(rows, inner, dtype=dtype)
        for attention, mlp in layers:
            for projection in (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj,
                               mlp.gate_proj, mlp.up_proj):
                F.linear(x, projection.weight)
            F.linear(gated, mlp.down_proj.weight)
        F.linear(x[:B], model.lm_head.weight)

    def call() -> None:
        with torch.no_grad():
            step(B * P)
            for _ in range(N - 1):
                step(B)

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
    walls = best_walls(timed_calls, args.repeats)
    engines = {engine: {"wall_s": round(walls[engine], 3), **profile_call(calls[engine])} for engine in ENGINES}
    report = {"shape": args.shape, "threads": args.threads, "torch": torch.__version__, "engines": engines}
    seconds = walls["weight_matmuls"]
    report["weight_matmuls_s"] = round(seconds, 3)
    report["speedup_ceiling"] = round(walls["hf_dynamic"] / seconds, 2)
    report["weight_matmul_gflops"] = round(flops / seconds / 1e9, 1)
    report["square_matmul_gflops"] = round(square_flops / walls["square_matmul"] / 1e9, 1)
    report["speedup_vs_hf_dynamic"] = round(walls["hf_dynamic"] / walls["static"], 2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
