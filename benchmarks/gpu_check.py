"""GPU check: the paper setup's costs on one GPU, measured in one command, with no model hub.

Student and teacher are built from the configs of Qwen3-1.7B and Qwen3-4B (vocabulary 151,936,
tied embeddings as in the real models) with random weights and saved beside a character
tokenizer; everything below loads them the way `lit-opd fit` does. Parts, each reported apart
(a part that fails is named under "errors" and the others still run):

  matmul            bf16 8192³ matrix products: the TFLOP/s this GPU gives, the MFU baseline;
  teacher_scoring   the in-trainer teacher's forward (`CausalLMScorer`, sampled-token log-probs
                    and the top-32) over rows cut to the 32k-token budget: tokens/s;
  generation        tokens/s of the `hf` engine (HF generate, dynamic cache), the `static` engine
                    eager and with CUDA graphs, and vLLM where it is importable (else listed under
                    "missing"), on the bfloat16 student; and of the `static` engine as a paper
                    config's fit runs it (float32 master weights under bf16 autocast): 64 rows,
                    128-token prompts, 256 new tokens, the second call of each timed; greedy_match_hf:
                    the share of 32 greedy tokens equal to HF generate's;
  train_step        `opd_block64` as shipped (configs/defaults.yaml + configs/opd_block64.yaml:
                    float32 master weights under bf16-mixed, a bfloat16 teacher, gradient
                    checkpointing, micro_batch_tokens 32,768, Block64 drift gate, AdamW) through a
                    Lightning Trainer: one rollout batch of 32 rows × 2,048 tokens used for 3
                    optimiser steps; the 2nd and 3rd (no rollout in them) are measured:
                    step_s, tokens_per_s (attended tokens), peak GiB (torch's allocator, reset at
                    each step's start) against the projection of benchmarks/memory.py's formula
                    (16 B a student parameter, the teacher at 2 B, activations max(3.08 GB,
                    tokens·(236 KB + layers·8 KB)) from the CPU rehearsal in RESULTS.md), and MFU:
                    model FLOPs (6·N·tokens + causal attention 6·layers·heads·head_dim·Σ S²) per
                    second over the datasheet's 989 TFLOP/s and over the matmul measured here.

Prints one JSON line. `--tiny` runs the same code on CPU with tiny shapes (the test suite does).

    python benchmarks/gpu_check.py            # on a GPU: ~4 minutes on an H200
    python benchmarks/gpu_check.py --tiny     # CPU, seconds
"""

import argparse
import importlib
import importlib.util
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

DATASHEET_BF16_FLOPS = 989e12  # H100/H200 SXM dense bf16
QWEN3 = dict(vocab_size=151_936, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
             max_position_embeddings=40_960, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
SHAPES = {
    "gpu": dict(
        device="cuda",
        student=dict(QWEN3, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16),
        teacher=dict(QWEN3, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32),
        train_rows=32, prompt_chars=60, new_tokens=1984, budget=32_768,
        gen_rows=64, gen_prompt=128, gen_new=256, score_rows=32, score_len=2048, matmul=8192,
    ),
    "tiny": dict(
        device="cpu",
        student=dict(QWEN3, vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512),
        teacher=dict(QWEN3, vocab_size=256, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512),
        train_rows=8, prompt_chars=12, new_tokens=24, budget=256,
        gen_rows=4, gen_prompt=8, gen_new=8, score_rows=4, score_len=64, matmul=256,
    ),
}
# The CPU rehearsal's activation fit (RESULTS.md, "Memory rehearsal at real width and vocabulary").
REHEARSED_FIXED_BYTES, REHEARSED_PER_TOKEN_BYTES, REHEARSED_PER_TOKEN_LAYER_BYTES = 3.08e9, 236e3, 8192
GIB = 2**30


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(device: str, fn) -> tuple[object, float]:
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


def save_models(directory: Path, shape: dict) -> dict[str, str]:
    """Random-weight student and teacher (bfloat16 files, seeds 0 and 1) with the character tokenizer."""
    from lit_opd.data.char_tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    paths = {}
    for seed, role in enumerate(("student", "teacher")):
        config = Qwen3Config(**shape[role])
        config.bos_token_id = config.pad_token_id = tokenizer.pad_token_id
        config.eos_token_id = tokenizer.eos_token_id
        torch.manual_seed(seed)
        with torch.device(shape["device"]):
            model = Qwen3ForCausalLM(config).to(torch.bfloat16)
        paths[role] = str(directory / role)
        model.save_pretrained(paths[role])
        tokenizer.save_pretrained(paths[role])
        del model
    return paths


def load(path: str, device: str) -> Qwen3ForCausalLM:
    return Qwen3ForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()


def matmul_flops(shape: dict) -> dict:
    """bf16 n×n×n products: median TFLOP/s of 10 after 3 warm-ups, on random data."""
    n, device = shape["matmul"], shape["device"]
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    times = []
    for i in range(13):
        _, seconds = timed(device, lambda: a @ b)
        if i >= 3:
            times.append(seconds)
    seconds = sorted(times)[len(times) // 2]
    return {"n": n, "tflops": round(2 * n**3 / seconds / 1e12, 1)}


def teacher_scoring(paths: dict, shape: dict) -> dict:
    """The in-trainer teacher's scoring (log-prob of each token and the top-32) of score_rows rows
    of score_len tokens, cut into forwards of at most `budget` tokens: tokens/s of the second pass."""
    from lit_opd.logprobs import CausalLMScorer

    device = shape["device"]
    scorer = CausalLMScorer(load(paths["teacher"], device))
    rows, length = shape["score_rows"], shape["score_len"]
    ids = torch.randint(10, shape["teacher"]["vocab_size"], (rows, length), device=device)
    mask = torch.ones_like(ids, dtype=torch.bool)
    per_call = max(1, shape["budget"] // length)

    def score():
        with torch.no_grad():
            for start in range(0, rows, per_call):
                scorer(ids[start : start + per_call], mask[start : start + per_call], length - 1, top_k=32)

    score()
    _, seconds = timed(device, score)
    del scorer
    return {"rows": rows, "tokens": rows * length, "seconds": round(seconds, 3),
            "tokens_per_s": round(rows * length / seconds)}


def generation(paths: dict, shape: dict, missing: list[str]) -> dict:
    """Tokens/s of each engine on the same prompts; the second call is timed (the first compiles,
    captures graphs or starts the engine)."""
    from lit_opd.rollout.engine import HFGenerateEngine, SamplingConfig
    from lit_opd.rollout.static_cache import StaticCacheEngine

    device = shape["device"]
    model = load(paths["student"], device)
    rows, new = shape["gen_rows"], shape["gen_new"]
    ids = torch.randint(10, shape["student"]["vocab_size"], (rows, shape["gen_prompt"]), device=device)
    mask = torch.ones_like(ids, dtype=torch.bool)
    sampling = SamplingConfig(max_new_tokens=new, temperature=1.0)
    engines = {"hf": HFGenerateEngine(), "static": StaticCacheEngine()}
    if device == "cuda":
        engines["static_cuda_graphs"] = StaticCacheEngine(cuda_graphs=True)
    if importlib.util.find_spec("vllm") is not None:
        from lit_opd.rollout.factory import build_engine
        from lit_opd.rollout.vllm_engine import VLLMSettings

        settings = VLLMSettings(gpu_memory_utilization=0.3, kv_cache_memory_bytes=None if device == "cuda" else 2**28)
        engines["vllm"] = build_engine("vllm", paths["student"], settings)
    else:
        missing.append("generation.vllm (vllm is not importable)")
    eos, pad = [model.config.eos_token_id], model.config.pad_token_id
    greedy = SamplingConfig(max_new_tokens=32, temperature=0.0)
    results, greedy_ids = {}, {}
    for name, engine in engines.items():
        def generate(sampling=sampling):
            return engine.generate(model, ids, mask, sampling, eos, pad, torch.Generator().manual_seed(0))

        generate()
        out, seconds = timed(device, generate)
        tokens = int(out.response_mask.sum())
        results[name] = {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds)}
        greedy_ids[name] = generate(greedy).response_ids
        engine.close()
    del model
    # As a paper config runs it in the fit: float32 master weights under bf16-mixed's autocast.
    model = Qwen3ForCausalLM.from_pretrained(paths["student"], dtype=torch.float32).to(device).eval()
    engine = StaticCacheEngine()
    with torch.autocast(device, dtype=torch.bfloat16):
        engine.generate(model, ids, mask, sampling, eos, pad, torch.Generator().manual_seed(0))
        out, seconds = timed(device, lambda: engine.generate(model, ids, mask, sampling, eos, pad,
                                                             torch.Generator().manual_seed(0)))
    tokens = int(out.response_mask.sum())
    results["static_float32_autocast"] = {"tokens": tokens, "seconds": round(seconds, 3),
                                          "tokens_per_s": round(tokens / seconds)}
    for name, out in greedy_ids.items():  # greedy tokens equal to HF generate's (bfloat16 kernels may differ)
        results[name]["greedy_match_hf"] = round(float((out == greedy_ids["hf"]).float().mean()), 3)
    del model
    return results


def paper_config(name: str) -> dict:
    """`model.init_args` of a shipped config as `lit-opd fit --config NAME --print_config` resolves it
    over defaults.yaml (`memory.merged_config`), and the trainer's precision."""
    from memory import merged_config

    merged = merged_config(name)
    return {**merged["model"]["init_args"], "precision": merged["trainer"]["precision"]}


def build_gates(specs: list[dict]) -> list:
    gates = []
    for spec in specs:
        module, _, name = spec["class_path"].rpartition(".")
        gates.append(getattr(importlib.import_module(module), name)(**spec.get("init_args", {})))
    return gates


def parameter_count(config: dict) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in Qwen3ForCausalLM(Qwen3Config(**config)).parameters())


def model_flops(config: dict, lengths: torch.Tensor) -> float:
    """Forward + backward FLOPs of one step over rows of `lengths` attended tokens: 6·N per token
    plus causal attention, 6·layers·heads·head_dim·S² per row of S tokens (QKᵀ and AV, halved by the
    causal mask, ×3 for the backward); gradient checkpointing's recomputation is not counted."""
    tokens = float(lengths.sum())
    width = config["num_attention_heads"] * config["head_dim"]
    return 6 * parameter_count(config) * tokens + 6 * config["num_hidden_layers"] * width * float((lengths.double() ** 2).sum())


def projected_step_bytes(shape: dict, micro_batch_tokens: int, teacher_bytes_per_parameter: int) -> float:
    """benchmarks/memory.py's projection of a training step's peak: persistent state + activations."""
    layers = shape["student"]["num_hidden_layers"]
    activations = max(REHEARSED_FIXED_BYTES, micro_batch_tokens * (REHEARSED_PER_TOKEN_BYTES + layers * REHEARSED_PER_TOKEN_LAYER_BYTES))
    persistent = 16 * parameter_count(shape["student"]) + teacher_bytes_per_parameter * parameter_count(shape["teacher"])
    return persistent + activations


def train_step(paths: dict, shape: dict, directory: Path, matmul_tflops: float | None) -> dict:
    """`opd_block64` through a Lightning Trainer; steps 2 and 3 of one rollout batch measured."""
    import lightning as L

    from lit_opd.data.prompts import PromptDataModule
    from lit_opd.data.synthetic import write_jsonl
    from lit_opd.modules import OptimConfig, RolloutConfig, SampledTokenOPD

    device = shape["device"]
    config = paper_config("opd_block64")
    samples = config["rollout"]["num_samples"]
    data_file = directory / "prompts.jsonl"
    problem = "1+2*3-4 " * (shape["prompt_chars"] // 8)
    write_jsonl(({"problem": f"{i}: {problem}", "answer": "0"} for i in range(shape["train_rows"] // samples)), data_file)
    steps: list[dict] = []

    class StepMeter(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            synchronize(device)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            synchronize(device)
            mask = module.buffer.minibatches[0]["attention_mask"]
            perf = {k.split("/", 1)[1]: round(float(v), 3) for k, v in trainer.callback_metrics.items() if k.startswith("perf/")}
            steps.append({"seconds": time.perf_counter() - self.start, "lengths": mask.sum(1).cpu(),
                          "padded_tokens": mask.numel(), "perf": perf,
                          "peak_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else 0})

    rollout = dict(config["rollout"], max_new_tokens=shape["new_tokens"], engine="static")
    rollout.pop("vllm", None)  # defaults.yaml's vLLM settings: a dict here, and the static engine needs none
    optim = {key: value for key, value in config["optim"].items() if key in ("lr", "weight_decay", "gradient_clip_val")}
    module = SampledTokenOPD(
        student=paths["student"], teacher=paths["teacher"], dtype=config["dtype"],
        gradient_checkpointing=config["gradient_checkpointing"], micro_batch_tokens=shape["budget"],
        chunk_size=config.get("chunk_size", 1024), gates=build_gates(config["gates"]),
        rollout=RolloutConfig(**rollout), optim=OptimConfig(**optim))
    data = PromptDataModule(paths["student"], str(data_file), instruction="", max_prompt_length=4 * shape["prompt_chars"],
                            prompts_per_rollout=shape["train_rows"] // samples, reuse=3, num_minibatches=1)
    precision = config["precision"] if device == "cuda" else "32-true"
    trainer = L.Trainer(max_steps=3, accelerator="gpu" if device == "cuda" else "cpu", devices=1, precision=precision,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[StepMeter()])
    trainer.fit(module, data)
    fit_peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    measured = steps[1:]
    seconds = sum(s["seconds"] for s in measured) / len(measured)
    lengths = measured[-1]["lengths"]
    flops = model_flops(shape["student"], lengths)
    teacher_bytes = 2 if module.teacher_dtype_name in (None, "bfloat16", "float16") or precision.startswith("bf16") else 4
    projected = projected_step_bytes(shape, min(shape["budget"], measured[-1]["padded_tokens"]), teacher_bytes)
    peak = max(s["peak_bytes"] for s in measured)
    result = {
        "config": "opd_block64", "precision": precision, "rows": int(lengths.numel()),
        "padded_tokens": measured[-1]["padded_tokens"], "attended_tokens": int(lengths.sum()),
        "micro_batch_tokens": shape["budget"], "first_step_s": round(steps[0]["seconds"], 2),
        "first_step_perf": steps[0]["perf"],
        "step_s": round(seconds, 3), "tokens_per_s": round(float(lengths.sum()) / seconds),
        "model_tflops_per_s": round(flops / seconds / 1e12, 1),
        "mfu_datasheet": round(flops / seconds / DATASHEET_BF16_FLOPS, 3),
        "step_peak_gib": round(peak / GIB, 2), "fit_peak_gib": round(fit_peak / GIB, 2),
        "projected_step_gib": round(projected / GIB, 2),
    }
    if matmul_tflops:
        result["mfu_measured_matmul"] = round(flops / seconds / (matmul_tflops * 1e12), 3)
    del trainer, module
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (the test suite's run)")
    parser.add_argument("--parts", nargs="+", default=["matmul", "teacher_scoring", "generation", "train_step"])
    args = parser.parse_args()
    shape = SHAPES["tiny" if args.tiny else "gpu"]
    if shape["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; run with --tiny for the CPU check")
    started = time.perf_counter()
    report: dict = {"shape": "tiny" if args.tiny else "qwen3-1.7b student, qwen3-4b teacher", "torch": torch.__version__,
                    "device": torch.cuda.get_device_name() if shape["device"] == "cuda" else "cpu",
                    "missing": [], "errors": {}}
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        paths, built_s = timed(shape["device"], lambda: save_models(directory, shape))
        report["build_models_s"] = round(built_s, 1)
        parts = {
            "matmul": lambda: matmul_flops(shape),
            "teacher_scoring": lambda: teacher_scoring(paths, shape),
            "generation": lambda: generation(paths, shape, report["missing"]),
            "train_step": lambda: train_step(paths, shape, directory, report.get("matmul", {}).get("tflops")),
        }
        for name in args.parts:
            try:
                report[name] = parts[name]()
                print(f"gpu_check: {name}: {json.dumps(report[name])}", file=sys.stderr, flush=True)
            except Exception as error:  # one part's failure is a finding; the others still run
                report["errors"][name] = "".join(traceback.format_exception_only(error)).strip()[-2000:]
                traceback.print_exc()
            if shape["device"] == "cuda":
                torch.cuda.empty_cache()
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report))
    if report["errors"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
