"""Teacher scoring throughput: the log-probs of every response token and the teacher's top-K support
(K = 32 outside 3 masked special ids, so K + 3 prompt log-probs a position) at every response
position, for one rollout batch, three ways:
  trainer     the teacher in the trainer (`CausalLMScorer`, no-grad forward, chunked top-K,
              `--trainer-rows` rows a forward as a token budget would cut them);
  colocated   a colocated vLLM engine (`VLLMTeacher`, prompt log-probs in vLLM's flat form);
  server      a `vllm serve` started here (`start_teacher_server`), over HTTP (`ServerTeacher`).
On a random-weight Qwen3 saved to a temporary directory. The ways take turns `rounds` times on the
same rows; each round scores the batch once, the first round is dropped. Our own work is timed
inside the rounds: the conversion of prompt log-probs into score tensors
(`scores_from_prompt_logprobs`) and, for the server, JSON parsing (`parse_json`).
`conversion_share` is the conversion's share of the colocated teacher's scoring time.
Prints one JSON line. Needs vLLM (run it in .venv-vllm):

    .venv-vllm/bin/python benchmarks/teacher_scoring.py                    # CPU shape
    .venv-vllm/bin/python benchmarks/teacher_scoring.py --shape cpu-wide --rows 16   # the forward dominates
    python benchmarks/teacher_scoring.py --shape qwen3-4b --rows 256 --trainer-rows 8   # a GPU (the paper's teacher)
"""

import argparse
import json
import os
import platform
import tempfile
import time
from collections import defaultdict

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from lit_opd.logprobs import CausalLMScorer
from lit_opd.rollout import teacher_engines
from lit_opd.rollout.teacher_engines import ServerTeacher, TeacherServing, VLLMTeacher
from lit_opd.rollout.teacher_server import start_teacher_server

SMALL = dict(vocab_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=False)
SHAPES = {
    "cpu": dict(config=dict(SMALL, hidden_size=256, intermediate_size=1024, num_hidden_layers=4),
                dtype="float32", prompt_len=32, response_len=128),
    "cpu-wide": dict(config=dict(SMALL, hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                                 num_attention_heads=16, num_key_value_heads=8),
                     dtype="float32", prompt_len=32, response_len=128),
    "qwen3-4b": dict(config=dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                                 num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
                     dtype="bfloat16", prompt_len=1024, response_len=3072),
}
MASKED = {0, 1, 2}  # stand-ins for the special tokens mask_special_tokens takes out of the support


def rows_for(shape: dict, rows: int, device: str) -> dict:
    """Random full-length prompts and responses (no padding)."""
    torch.manual_seed(1)
    length = shape["prompt_len"] + shape["response_len"]
    ids = torch.randint(1, shape["config"]["vocab_size"], (rows, length), device=device)
    response = ids[:, shape["prompt_len"]:]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids, dtype=torch.bool), "response_ids": response,
            "response_mask": torch.ones_like(response, dtype=torch.bool)}


def timed(module, name: str, seconds: dict) -> None:
    """Wrap `module.name` so that its wall time adds up in `seconds[name]` (thread-safe enough: the
    server's readers run in threads, their sum is CPU-bound Python under one lock)."""
    inner = getattr(module, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            seconds[name] += time.perf_counter() - start

    setattr(module, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--trainer-rows", type=int, default=16, help="rows per trainer forward")
    parser.add_argument("--ways", nargs="+", choices=["trainer", "colocated", "server"],
                        default=["trainer", "colocated", "server"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape, device = SHAPES[args.shape], "cuda" if torch.cuda.is_available() else "cpu"
    share = 0.3 if device == "cuda" else 0.1
    path = tempfile.mkdtemp(prefix="teacher_scoring_")
    torch.manual_seed(0)
    Qwen3ForCausalLM(Qwen3Config(**shape["config"], max_position_embeddings=8192)).to(
        getattr(torch, shape["dtype"])).save_pretrained(path)
    rows, max_len = rows_for(shape, args.rows, device), shape["prompt_len"] + shape["response_len"] + 1
    settings = TeacherServing(gpu_memory_utilization=share, max_model_len=max_len)
    exclude, max_logprobs = set(MASKED), args.top_k + len(MASKED)
    ours = defaultdict(float)  # seconds in our conversion and JSON parsing, per round and way
    timed(teacher_engines, "scores_from_prompt_logprobs", ours)
    timed(teacher_engines, "parse_json", ours)
    scorers, server = {}, None
    if "trainer" in args.ways:
        model = CausalLMScorer(Qwen3ForCausalLM.from_pretrained(path, dtype=getattr(torch, shape["dtype"])).to(device).eval())
        def score_in_trainer():
            for i in range(0, args.rows, args.trainer_rows):
                part = slice(i, i + args.trainer_rows)
                model(rows["input_ids"][part], rows["attention_mask"][part], shape["response_len"], top_k=args.top_k,
                      exclude=torch.tensor(sorted(exclude), device=device))

        scorers["trainer"] = score_in_trainer
    if "colocated" in args.ways:
        colocated = VLLMTeacher(path, settings, max_logprobs, shape["dtype"])
        scorers["colocated"] = lambda: colocated.score(rows, args.top_k, exclude)
    if "server" in args.ways:
        server = start_teacher_server(path, max_logprobs, shape["dtype"], gpu_memory_utilization=share,
                                      max_model_len=max_len)
        remote = ServerTeacher(server.url, path, settings)
        scorers["server"] = lambda: remote.score(rows, args.top_k, exclude)
    seconds, parts = {way: [] for way in scorers}, {way: [] for way in scorers}
    try:
        for _ in range(args.rounds + 1):  # the first round warms up and is dropped
            for way, score in scorers.items():
                if device == "cuda":
                    torch.cuda.synchronize()
                ours.clear()
                start = time.perf_counter()
                with torch.no_grad():
                    score()
                if device == "cuda":
                    torch.cuda.synchronize()
                seconds[way].append(time.perf_counter() - start)
                parts[way].append(dict(ours))
    finally:
        if server is not None:
            server.close()
    tokens = args.rows * shape["response_len"]
    best = {way: tokens / min(s[1:]) for way, s in seconds.items()}

    def breakdown(way: str) -> dict:
        """Mean seconds per round: ours (conversion, JSON parsing) and the rest (vLLM's call, HTTP)."""
        rounds = parts[way][1:]
        conversion = sum(p.get("scores_from_prompt_logprobs", 0.0) for p in rounds) / len(rounds)
        parsing = sum(p.get("parse_json", 0.0) for p in rounds) / len(rounds)
        total = sum(seconds[way][1:]) / len(rounds)
        return {"seconds": round(total, 3), "conversion_s": round(conversion, 4),
                **({"json_s": round(parsing, 4)} if way == "server" else {}),
                "rest_s": round(total - conversion - parsing, 3)}

    report = {
        **{f"{way}_tokens_per_s": round(best[way]) for way in best},
        **({"conversion_share": round(breakdown("colocated")["conversion_s"] / breakdown("colocated")["seconds"], 4)}
           if "colocated" in best else {}),
        **{f"{way}_vs_trainer": round(best[way] / best["trainer"], 2) for way in best if "trainer" in best and way != "trainer"},
        "breakdown": {way: breakdown(way) for way in best if way != "trainer"},
        "shape": args.shape, "rows": args.rows, "top_k": args.top_k, "masked": len(MASKED), "tokens": tokens,
        "environment": {"torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
                        "threads": args.threads, "cuda": torch.cuda.get_device_name() if device == "cuda" else None},
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
