"""Memory rehearsal: one optimiser step of sampled-token OPD at real width and vocabulary, and from
it the peak GPU memory of every shipped paper config at real depth.

Rehearsal. Student and teacher have Qwen3-1.7B's width, heads and vocabulary (2,048 wide, 16/8
heads, 151,936 embedding rows, tied embeddings like the real model), cut to `--layers` layers,
random weights, float32 on this CPU, gradient
checkpointing on as in the paper configs. One optimiser step is the real one (`lit-opd fit`'s
Trainer and module): generate `--new-tokens` tokens per row with the static-cache engine (random
weights never sample EOS, so every row has the same length), score with the teacher, forward and
backward per micro-batch, AdamW, whose moments are allocated before it (a zero-gradient step), so
that the step is a steady-state one: moments held, activations on top. Each case (rows, budget, layers) runs in a process of its own,
since a process's peak resident set never falls: the peak of the case is its own. Cases: 32, 64
and 128 rows with `--budget` tokens per micro-batch and without a budget, and 64 rows without a
budget at 2·`--layers` layers (the per-layer cost).

Per case: peak_rss_bytes, rolled_out_bytes (the peak after generation and scoring),
step_growth_bytes (the resident set's growth from the step's start to its peak before AdamW's
update: gradients and activations; the peak is reset at the step's start, /proc/self/clear_refs), tokens
(padded tokens of the step), micro_batches, micro_batch_tokens_max, step_s (forward + backward
per micro-batch + AdamW, the rollout excluded). The
checkpoints are written before the cases, so that no case's peak holds their creation.

Projection (`projection`): the step's activations (step_growth_bytes less the student's
gradients) as max(fixed, tokens·(b + layers·c)), `activation_costs` (fixed: the vocabulary-sized
buffers, with the lm_head chunk of `--chunk-size` positions, 128 by default so that the per-token
costs show, and a config's own chunk_size put in its place, `lm_head_chunk_bytes`; c: the
checkpointed float32 layer input; b: the rest per token; float32 on this CPU; under bf16-mixed the
checkpointed residual stream stays float32 and the rest is smaller, so these are used as measured). For each shipped paper config, at real depth (28 layers; the
teacher's 36), peak GPU memory on one GPU and per GPU under FSDP2 on 8 is
  persistent (student: 16 bytes/parameter in float32 with AdamW, teacher at its dtype;
  under FSDP2 both divided by 8) + max(training step, generation, evaluation)
with the training step at the config's micro_batch_tokens; with rollout.engine vllm (the paper
configs') generation and evaluation are vLLM's share of an 80 GB GPU (rollout.vllm.
gpu_memory_utilization: its bfloat16 weights and KV cache; asleep during the step); otherwise
generation's KV cache at rollout.generate_batch_size rows × (max_prompt_length + max_new_tokens) in bfloat16 plus one
float32 [rows, vocab] logits buffer (under FSDP2 the gathered student's float32 weights too), and
evaluation the same at PassAtKEvaluation's batch_size. Only sampled-token OPD is rehearsed;
Teacher-TopK adds its buffered top-K and GKD the teacher's hidden states and lm_head chunk in the
step, counted from their shapes.

    python benchmarks/memory.py                              # every case (~30 min on 2 cores)
    python benchmarks/memory.py --rows 32 --budget 4096      # fewer cases
"""

import argparse
import contextlib
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from transformers import Qwen3Config, Qwen3ForCausalLM

from lit_opd.configs import shipped_configs
from lit_opd.data.char_tokenizer import build_char_tokenizer
from lit_opd.loading import frozen_teacher_dtype

VOCAB = 151_936
STUDENT = dict(hidden_size=2048, intermediate_size=6144, num_attention_heads=16, num_key_value_heads=8, head_dim=128)
TEACHER = dict(hidden_size=2560, intermediate_size=9728, num_attention_heads=32, num_key_value_heads=8, head_dim=128)
REAL_LAYERS = {"student": 28, "teacher": 36}
GIB = 2**30
GPU_BYTES = 85_029_158_912  # an 80 GB A100/H100 as CUDA reports it (79.2 GiB): vLLM's share is of this


def qwen3_config(shape: dict, layers: int) -> Qwen3Config:
    return Qwen3Config(vocab_size=VOCAB, num_hidden_layers=layers, tie_word_embeddings=True,
                       max_position_embeddings=40960, **shape)


def parameter_count(shape: dict, layers: int) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in Qwen3ForCausalLM(qwen3_config(shape, layers)).parameters())


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def status_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since the last `reset_peak`) of this process, in bytes."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field + ":"))


def reset_peak() -> None:
    """Set this process's peak resident set (VmHWM) to its resident set now (Linux)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def save_models(directory: Path, layers: int) -> dict[str, str]:
    """Random-weight student and teacher of real width and vocabulary, `layers` deep, with the tokenizer."""
    tokenizer = build_char_tokenizer()
    paths = {}
    for seed, role in enumerate(("student", "teacher")):
        path = directory / f"{role}-{layers}"
        if not path.exists():
            config = qwen3_config(STUDENT, layers)
            config.bos_token_id = config.pad_token_id = tokenizer.pad_token_id
            config.eos_token_id = tokenizer.eos_token_id
            torch.manual_seed(seed)
            # Saved in bfloat16 and loaded in float32, so the loaded weights are copies in anonymous
            # memory: memory-mapped float32 files would count in the resident set only while the
            # kernel keeps their pages, which made the peaks of earlier runs drift by ~0.7 GB.
            Qwen3ForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
            tokenizer.save_pretrained(path)
        paths[role] = str(path)
    return paths


def run_case(rows: int, budget: int, layers: int, args) -> dict:
    """One optimiser step in this process; the peaks after each phase."""
    import lightning as L

    from lit_opd.data.prompts import PromptDataModule
    from lit_opd.data.synthetic import write_jsonl
    from lit_opd.modules import OptimConfig, RolloutConfig, SampledTokenOPD
    from lit_opd.rollout.micro_batches import cut_rows, prompt_response_lengths

    marks: dict[str, float] = {}

    class Measured(SampledTokenOPD):
        def on_train_start(self):
            """AdamW's moments allocated up front (a zero-gradient step moves nothing), so that the
            one measured step is a steady-state step: moments held, activations on top."""
            optimizer = self.optimizers().optimizer
            for p in self.policy.parameters():
                p.grad = torch.zeros_like(p)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def on_train_batch_end(self, outputs, batch, batch_idx):
            marks["step_s"] = time.perf_counter() - marks["rolled_out_at"]
            super().on_train_batch_end(outputs, batch, batch_idx)

        def fill_buffer(self, batch):
            super().fill_buffer(batch)
            marks["rolled_out"], marks["rolled_out_at"] = peak_rss(), time.perf_counter()
            marks["step_start_rss"] = status_bytes("VmRSS")
            reset_peak()

        def optimizer_step(self):
            marks["step_peak"] = status_bytes("VmHWM")  # the forwards and backwards, before AdamW
            super().optimizer_step()

    paths = save_models(Path(args.model_dir), layers)
    samples = 8
    data_file = Path(args.model_dir) / f"prompts-{rows}.jsonl"
    problem = "1+2*3-4 " * (args.prompt_tokens // 8)
    write_jsonl(({"problem": f"{i}: {problem}", "answer": "0"} for i in range(rows // samples)), data_file)
    module = Measured(student=paths["student"], teacher=paths["teacher"], dtype="float32",
                      gradient_checkpointing=True, micro_batch_tokens=budget, chunk_size=args.chunk_size,
                      rollout=RolloutConfig(num_samples=samples, max_new_tokens=args.new_tokens, score_batch_size=rows),
                      optim=OptimConfig(lr=1e-6, gradient_clip_val=1.0))
    data = PromptDataModule(paths["student"], str(data_file), instruction="", max_prompt_length=4 * args.prompt_tokens,
                            prompts_per_rollout=rows // samples, reuse=1, num_minibatches=1)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", precision="32-true", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, data)
    mb = module.buffer.minibatches[0]
    parts = cut_rows(*prompt_response_lengths(mb), budget)
    return {
        "rows": rows, "budget": budget, "layers": layers,
        "tokens": int(mb["input_ids"].numel()),
        "micro_batch_tokens_max": max(len(p) * int(mb["attention_mask"][p].any(0).sum()) for p in parts),
        "micro_batches": len(parts),
        "peak_rss_bytes": peak_rss(),
        "rolled_out_bytes": int(marks["rolled_out"]),
        "step_growth_bytes": int(marks["step_peak"] - marks["step_start_rss"]),
        "step_s": round(marks["step_s"], 2),
    }


def activation_costs(cases: list[dict]) -> dict[str, float]:
    """The step's activations (step_growth_bytes less the student's gradients, 4 bytes a parameter,
    counted apart in the projection) as max(fixed, tokens·(b + layers·c)), two phases of the step:
    fixed: the vocabulary-sized buffers (lm_head chunk, the tied embedding's gradient in float32 and
        its accumulation), which set the peak of every budgeted case (their micro-batches are small);
    c: what gradient checkpointing keeps per token and layer, the layer's float32 input (4·hidden);
    b: per token outside that (the recomputed layer, the final hidden states), from the unbudgeted
        case with the most tokens, its intercept taken as 0: an upper bound."""
    def activations(case: dict) -> float:
        return case["step_growth_bytes"] - 4 * parameter_count(STUDENT, case["layers"])

    fixed = max(activations(c) for c in cases if c["budget"] > 0)
    largest = max((c for c in cases if c["budget"] == 0), key=lambda c: c["tokens"])
    c = 4 * STUDENT["hidden_size"]
    return {"fixed_bytes": fixed, "b_bytes_per_token": activations(largest) / largest["tokens"] - largest["layers"] * c,
            "c_bytes_per_token_layer": c}


def lm_head_chunk_bytes(chunk_size: int) -> int:
    """What one lm_head chunk holds in the backward: float32 logits, probabilities and their
    gradient, [chunk_size, vocab] each."""
    return 3 * chunk_size * VOCAB * 4


def kv_bytes_per_token(shape: dict, layers: int, bytes_per_value: int = 2) -> int:
    return layers * 2 * shape["num_key_value_heads"] * shape["head_dim"] * bytes_per_value


def project(config_name: str, fit: dict[str, float]) -> dict:
    """Peak GPU GiB of one shipped paper config at real depth: one GPU, and per GPU of FSDP2 on 8."""
    merged = merged_config(config_name)
    model, data = merged["model"]["init_args"], merged["data"]
    rollout = model["rollout"]
    evaluation = next(c["init_args"] for c in merged["trainer"]["callbacks"] if c["class_path"].endswith("PassAtKEvaluation"))
    dtype_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}
    student_params = parameter_count(STUDENT, REAL_LAYERS["student"])
    teacher_params = parameter_count(TEACHER, REAL_LAYERS["teacher"])
    student_bytes = student_params * (dtype_bytes[model["dtype"]] * 2 + 8)  # weights, gradients, AdamW's two moments
    teacher_dtype = frozen_teacher_dtype(model.get("teacher_dtype"), model["dtype"], merged["trainer"].get("precision"))
    teacher_bytes = teacher_params * dtype_bytes[teacher_dtype]
    tokens = model.get("micro_batch_tokens") or data["prompts_per_rollout"] * rollout["num_samples"] // data[
        "num_minibatches"] * (data["max_prompt_length"] + rollout["max_new_tokens"])
    chunk_change = lm_head_chunk_bytes(model.get("chunk_size", 1024)) - lm_head_chunk_bytes(fit["chunk_size"])
    step = max(fit["fixed_bytes"] + chunk_change,
               tokens * (fit["b_bytes_per_token"] + REAL_LAYERS["student"] * fit["c_bytes_per_token_layer"]))
    rows = data["prompts_per_rollout"] * rollout["num_samples"]
    module = merged["model"]["class_path"].rsplit(".", 1)[-1]
    if module == "TeacherTopKLSM":  # the buffer's teacher top-K (float32 log-probs, int64 ids) for every row
        step += rows * rollout["max_new_tokens"] * model.get("top_k", 32) * 12
    if module == "GKD":  # the teacher's hidden states and its own lm_head chunk in the step (not rehearsed)
        step += tokens * TEACHER["hidden_size"] * 4 + 2 * model.get("chunk_size", 1024) * VOCAB * 4
    kv = kv_bytes_per_token(STUDENT, REAL_LAYERS["student"])
    eval_rows = evaluation.get("batch_size", 64)
    extra = {}
    if rollout.get("engine") == "vllm":
        # vLLM's pool (bfloat16 weights + KV cache, its share of the GPU) while it generates or
        # evaluates; asleep at level 2 during the step (weights and KV cache released).
        share = rollout.get("vllm", {}).get("gpu_memory_utilization", 0.3)
        generation = evaluation_bytes = share * GPU_BYTES
        weights = student_params * 2
        extra = {"vllm_share": share, "vllm_weights_gib": round(weights / GIB, 1),
                 "vllm_kv_cache_gib": round((share * GPU_BYTES - weights) / GIB, 1),
                 "vllm_kv_cache_tokens": int((share * GPU_BYTES - weights) // kv)}
        one = student_bytes + teacher_bytes + max(step, generation)
        fsdp8 = (student_bytes + teacher_bytes) / 8 + max(step, generation)  # weights pushed one tensor at a time
    else:
        gen_rows = rollout.get("generate_batch_size") or rows
        generation = gen_rows * ((data["max_prompt_length"] + rollout["max_new_tokens"]) * kv + VOCAB * 4)
        evaluation_bytes = eval_rows * ((data["max_prompt_length"] + evaluation["max_new_tokens"]) * kv + VOCAB * 4)
        gathered = student_params * dtype_bytes[model["dtype"]]
        one = student_bytes + teacher_bytes + max(step, generation, evaluation_bytes)
        fsdp8 = (student_bytes + teacher_bytes) / 8 + max(step, generation + gathered, evaluation_bytes + gathered)
    return {
        "config": config_name, "engine": rollout.get("engine", "static"),
        "micro_batch_tokens": model.get("micro_batch_tokens", 0),
        "generate_batch_size": rollout.get("generate_batch_size", 0), "eval_batch_size": eval_rows,
        "gib": {"student_state": student_bytes / GIB, "teacher": teacher_bytes / GIB, "train_step": step / GIB,
                "generation": generation / GIB, "evaluation": evaluation_bytes / GIB},
        **extra,
        "one_gpu_gib": round(one / GIB, 1), "fsdp2_8_gpus_per_gpu_gib": round(fsdp8 / GIB, 1),
        "fits_80gb": bool(one < GPU_BYTES),
    }


def merged_config(name: str) -> dict:
    """A shipped config as `lit-opd fit --config NAME --print_config` resolves it (over defaults.yaml)."""
    from lit_opd.cli import main as lit_opd_main

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.suppress(SystemExit):
        lit_opd_main(["fit", "--config", name, "--print_config"])
    return yaml.safe_load(printed.getvalue())


def paper_configs() -> list[str]:
    """Shipped training configs of the paper setup (not the quickstart's, the strategies, eval)."""
    return [n for n in shipped_configs() if "/" not in n and n not in ("defaults", "eval")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--budget", type=int, default=2048, help="micro_batch_tokens of the budgeted cases")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=128, help="lm_head positions per chunk (small, so that "
                        "the per-token costs, not the fixed lm_head chunk, set the step's peak)")
    parser.add_argument("--model-dir", default=None, help="where the random-weight checkpoints go (default: a temp dir)")
    parser.add_argument("--project", metavar="CASES", help="no runs: fit and project from a file of case lines "
                        "(the JSON objects an earlier run printed to stderr, one a line)")
    parser.add_argument("--fit", metavar="JSON", help="no runs: project from the \"fit\" object an earlier run printed")
    parser.add_argument("--case", type=int, nargs=3, metavar=("ROWS", "BUDGET", "LAYERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.case:
        print(json.dumps(run_case(*args.case, args)))
        return
    if args.fit:
        fit = json.loads(args.fit)
        print(json.dumps({"fit": fit, "projection": [project(name, fit) for name in paper_configs()]}, indent=1))
        return
    if args.project:
        cases = [json.loads(line) for line in Path(args.project).read_text().splitlines() if line.startswith("{")]
        report(cases, args)
        return
    with tempfile.TemporaryDirectory() as scratch:
        args.model_dir = args.model_dir or scratch
        for layers in (args.layers, 2 * args.layers):
            save_models(Path(args.model_dir), layers)
        cases = [(rows, budget, args.layers) for budget in (args.budget, 0) for rows in args.rows]
        cases += [(args.rows[len(args.rows) // 2], 0, 2 * args.layers)]
        results = []
        for case in cases:
            command = [sys.executable, __file__, "--case", *map(str, case), "--model-dir", args.model_dir,
                       "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
                       "--threads", str(args.threads), "--chunk-size", str(args.chunk_size)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"case {case} failed:\n{done.stderr[-3000:]}")
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), file=sys.stderr)
    report(results, args)


def report(cases: list[dict], args) -> None:
    fit = activation_costs(cases)
    fit["chunk_size"] = args.chunk_size
    print(json.dumps({
        "settings": {k: v for k, v in vars(args).items() if k not in ("case", "model_dir", "project")},
        "torch": torch.__version__,
        "cases": cases,
        "fit": fit,
        "projection": [project(name, fit) for name in paper_configs()],
    }, indent=1))


if __name__ == "__main__":
    main()
