"""Rollout throughput: HF `generate` (dynamic cache), HF `generate` (static cache; on CUDA HF then
compiles the forward itself), the static-KV-cache engine (`StaticCacheEngine`: eager, and on CUDA
also with CUDA graphs) and, where vLLM is installed, the vllm engine (`VLLMEngine`, in-process, built
from the model saved to a temporary directory; its first call starts the engine), on random-weight Qwen3 models, sampling at temperature 1 with no EOS so
that every row generates exactly `new_tokens` tokens.

Shapes: "cpu" (4 layers, width 256, vocab 512, batch 64, prompt 32, 128 new tokens, float32) and
"cpu-bf16" (the same in bfloat16, every engine) always;
"qwen3-0.6b" (the Qwen3-0.6B architecture, bfloat16, prompt 128, 512 new tokens) at batch 64 and 256
where CUDA is present.

Each (shape, engine) runs in a fresh process, so that peaks do not mix and one-time costs are not
hidden: a first call, then `repeats` timed calls. The engines of a shape take turns, `rounds` times,
so that a noisy neighbour on the machine slows them alike. Prints one JSON object; per engine:
  tokens_per_s      B · new_tokens / wall seconds of one generate call (prefill included), best call;
  tokens_per_cpu_s  the same per second of process CPU time: with one thread, what the engine would
                    do on a machine of its own (other processes do not count against it);
  warmup_s          the first call's extra seconds over the best call (compilation, graph capture,
                    lazy initialisation), best process;
  peak_bytes        CUDA: max_memory_allocated during the calls minus what was allocated before (the
                    model); CPU: growth of the process's peak resident set over the calls;
  speedup_vs_hf_dynamic  tokens_per_s over HF dynamic's;
and every process's own figures under "runs".

    python benchmarks/rollout.py                                 # all shapes this machine can run
    python benchmarks/rollout.py --shapes cpu --rounds 3 --threads 2
    .venv-vllm/bin/python benchmarks/rollout.py --shapes cpu --engines hf_dynamic static vllm
"""

import argparse
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import torch
from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

from lit_opd.rollout.engine import SamplingConfig
from lit_opd.rollout.static_cache import StaticCacheEngine

TINY_QWEN3 = dict(
    vocab_size=512, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=64, tie_word_embeddings=False, max_position_embeddings=1024,
)
QWEN3_0_6B = dict(
    vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
    num_key_value_heads=8, head_dim=128, tie_word_embeddings=True, max_position_embeddings=40960,
    rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
)
SHAPES = {
    "cpu": dict(device="cpu", dtype="float32", batch=64, prompt_len=32, new_tokens=128, config=TINY_QWEN3),
    "cpu-bf16": dict(device="cpu", dtype="bfloat16", batch=64, prompt_len=32, new_tokens=128, config=TINY_QWEN3),
    **{
        f"qwen3-0.6b-b{batch}": dict(
            device="cuda", dtype="bfloat16", batch=batch, prompt_len=128, new_tokens=512, config=QWEN3_0_6B
        )
        for batch in (64, 256)
    },
}
VLLM = ["vllm"] if importlib.util.find_spec("vllm") else []
ENGINES = {
    "cpu": ["hf_dynamic", "hf_static", "static", *VLLM],
    "cuda": ["hf_dynamic", "hf_static", "static", "static_cuda_graphs", *VLLM],
}


def build(shape: dict) -> tuple[Qwen3ForCausalLM, torch.Tensor, torch.Tensor]:
    """The random model (seed 0) and [B, P] prompts: random ids, full length (no padding)."""
    torch.manual_seed(0)
    with torch.device(shape["device"]):
        model = Qwen3ForCausalLM(Qwen3Config(**shape["config"]))
    model = model.to(getattr(torch, shape["dtype"])).eval()
    ids = torch.randint(1, model.config.vocab_size, (shape["batch"], shape["prompt_len"]), device=shape["device"])
    return model, ids, torch.ones_like(ids, dtype=torch.bool)


def generate_fn(engine: str, model, ids, mask, new_tokens: int):
    """A no-argument callable that runs one rollout batch with `engine`."""
    if engine.startswith("hf"):
        config = GenerationConfig(
            do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, pad_token_id=0, eos_token_id=None,
            cache_implementation="static" if engine == "hf_static" else None,
        )

        def run():
            with torch.no_grad():
                model.generate(input_ids=ids, attention_mask=mask.long(), generation_config=config)

        return run
    sampling = SamplingConfig(max_new_tokens=new_tokens, temperature=1.0)
    generator = torch.Generator(device="cpu" if engine == "vllm" else ids.device).manual_seed(0)
    if engine == "vllm":  # the config has no EOS id, so every row runs to new_tokens
        from lit_opd.rollout.vllm_engine import VLLMEngine, VLLMSettings

        path = tempfile.mkdtemp(prefix="rollout_bench_")
        model.save_pretrained(path)
        share = 0.5 if ids.is_cuda else 0.1
        vllm = VLLMEngine(path, VLLMSettings(gpu_memory_utilization=share, enable_sleep_mode=False,
                                             max_model_len=ids.shape[1] + new_tokens))
        return lambda: vllm.generate(model, ids, mask, sampling, [], 0, generator)
    static = StaticCacheEngine(cuda_graphs=engine == "static_cuda_graphs")
    return lambda: static.generate(model, ids, mask, sampling, [], 0, generator)


def timed(run, device: str) -> tuple[float, float]:
    """Wall-clock and process-CPU seconds of one call."""
    if device == "cuda":
        torch.cuda.synchronize()
    start, start_cpu = time.perf_counter(), time.process_time()
    run()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - start_cpu


def worker(shape_name: str, engine: str, repeats: int) -> dict:
    """One (shape, engine) measurement in this process."""
    shape = SHAPES[shape_name]
    model, ids, mask = build(shape)
    run = generate_fn(engine, model, ids, mask, shape["new_tokens"])
    if shape["device"] == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    first, _ = timed(run, shape["device"])
    calls = [timed(run, shape["device"]) for _ in range(repeats)]
    if shape["device"] == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    tokens = shape["batch"] * shape["new_tokens"]
    return {
        "first_call_s": round(first, 3),
        # Floored at 0: where there is nothing to warm up, noise can make the first call the fastest.
        "warmup_s": round(max(first - min(wall for wall, _ in calls), 0.0), 3),
        "tokens_per_s": [round(tokens / wall) for wall, _ in calls],
        "tokens_per_cpu_s": [round(tokens / cpu) for _, cpu in calls],
        "peak_bytes": peak,
    }


def summary(runs: list[dict]) -> dict:
    """Best figures over an engine's processes (the ones that did not fail)."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"runs": runs}
    return {
        "tokens_per_s": max(t for r in ok for t in r["tokens_per_s"]),
        "tokens_per_cpu_s": max(t for r in ok for t in r["tokens_per_cpu_s"]),
        "warmup_s": min(r["warmup_s"] for r in ok),
        "peak_bytes": max(r["peak_bytes"] for r in ok),
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), help="default: every shape this machine runs")
    parser.add_argument(
        "--engines", nargs="+", choices=sorted(set(ENGINES["cpu"] + ENGINES["cuda"])), help="default: all the device has"
    )
    parser.add_argument(
        "--rounds", type=int, help="turns each engine of a shape takes, a fresh process each (default: CPU 2, CUDA 1)"
    )
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per process, after the first call")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch.set_num_threads")
    parser.add_argument("--worker", nargs=2, metavar=("SHAPE", "ENGINE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(*args.worker, args.repeats)))
        return
    shapes = args.shapes or [n for n, s in SHAPES.items() if s["device"] == "cpu" or torch.cuda.is_available()]
    report = {
        "environment": {
            "torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "threads": args.threads, "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
        "shapes": {},
    }
    for name in shapes:
        shape = SHAPES[name]
        engines = [e for e in ENGINES[shape["device"]] if not args.engines or e in args.engines]
        runs = {engine: [] for engine in engines}
        rounds = args.rounds or (2 if shape["device"] == "cpu" else 1)
        for _ in range(rounds):
            for engine in engines:
                command = [sys.executable, __file__, "--worker", name, engine, "--repeats", str(args.repeats),
                           "--threads", str(args.threads)]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode == 0:
                    runs[engine].append(json.loads(done.stdout.strip().splitlines()[-1]))
                else:  # e.g. out of memory: report it and go on with the other engines
                    runs[engine].append({"error": done.stderr.strip().splitlines()[-1:]})
        results = {engine: summary(rs) for engine, rs in runs.items()}
        base = results.get("hf_dynamic", {})
        for result in results.values():
            if "tokens_per_s" in result and "tokens_per_s" in base:
                result["speedup_vs_hf_dynamic"] = round(result["tokens_per_s"] / base["tokens_per_s"], 2)
                cpu_ratio = result["tokens_per_cpu_s"] / base["tokens_per_cpu_s"]
                result["cpu_time_speedup_vs_hf_dynamic"] = round(cpu_ratio, 2)
        report["shapes"][name] = {k: v for k, v in shape.items() if k != "config"} | {"engines": results}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
