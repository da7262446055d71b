"""Where a rollout call spends its time: HF `generate` (dynamic cache) and the fast engine on one
shape of benchmarks/rollout.py, under the PyTorch profiler. Prints one JSON object; per engine:
  wall_s       one generate call without the profiler (after a warm-up call), best of `repeats`;
  matmul_s     profiled self CPU seconds of aten::mm / addmm / bmm (the weight and attention matmuls
               that are not inside an attention kernel);
  attention_s  profiled self CPU seconds of the ops whose name contains "attention" (SDPA kernels);
  other_s      every other op's profiled self CPU seconds;
  profiled_s   their sum (the profiler adds its own overhead, so it exceeds wall_s).

    python benchmarks/rollout_profile.py --threads 1
"""

import argparse
import json
import time

import torch
from torch.profiler import profile

from rollout import SHAPES, build, generate_fn

MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")


def profile_engine(engine: str, shape: dict, repeats: int) -> dict[str, float]:
    model, ids, mask = build(shape)
    generate = generate_fn(engine, model, ids, mask, shape["new_tokens"])
    generate()
    walls = []
    for _ in range(repeats):
        started = time.perf_counter()
        generate()
        walls.append(time.perf_counter() - started)
    with profile() as profiler:
        generate()
    seconds = {event.key: event.self_cpu_time_total / 1e6 for event in profiler.key_averages()}
    matmul = sum(seconds.get(name, 0.0) for name in MATMULS)
    attention = sum(value for name, value in seconds.items() if "attention" in name)
    total = sum(seconds.values())
    return {
        "wall_s": round(min(walls), 3),
        "matmul_s": round(matmul, 3),
        "attention_s": round(attention, 3),
        "other_s": round(total - matmul - attention, 3),
        "profiled_s": round(total, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="cpu", choices=[n for n, s in SHAPES.items() if s["device"] == "cpu"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engines = {engine: profile_engine(engine, SHAPES[args.shape], args.repeats) for engine in ("hf_dynamic", "fast")}
    print(json.dumps({"shape": args.shape, "threads": args.threads, "torch": torch.__version__, "engines": engines},
                     indent=2))


if __name__ == "__main__":
    main()
