"""A rollout batch's time with the teacher on a `vllm serve`, scored after generation or beside it
(`RolloutCollector.collect`: each `--generate-batch-size` part of the student's vLLM rollouts goes to
the server as soon as it is generated). The student generates with the vllm engine in this process;
random-weight Qwen3s over the character tokenizer (saved to a temporary directory), the server
started here (`start_teacher_server`). The two ways take turns `rounds` times after a
warm-up round. Prints one JSON object: per way the seconds per rollout batch (best, and each
round), its generation and teacher-wait seconds (perf/generate_s, perf/teacher_s), and the ratio
after / beside; "parts_after" generates in the same parts as "beside" but scores after (what the
parts alone cost). Needs vLLM (run it in .venv-vllm):

    .venv-vllm/bin/python benchmarks/scoring_overlap.py
"""

import argparse
import json
import os
import platform
import tempfile
import time

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from lit_opd.data.char_tokenizer import build_char_tokenizer
from lit_opd.logprobs import CausalLMScorer
from lit_opd.rollout.collection import RolloutCollector
from lit_opd.rollout.scoring import ScoringSettings
from lit_opd.rollout.settings import RolloutConfig
from lit_opd.rollout.teacher_engines import ServerTeacher, TeacherServing
from lit_opd.rollout.teacher_server import start_teacher_server
from lit_opd.rollout.vllm_engine import VLLMEngine, VLLMSettings


def save_model(path: str, tokenizer, layers: int, width: int, seed: int) -> str:
    config = Qwen3Config(vocab_size=-(-len(tokenizer) // 64) * 64, hidden_size=width, intermediate_size=4 * width,
                         num_hidden_layers=layers, num_attention_heads=width // 64, num_key_value_heads=max(1, width // 128),
                         head_dim=64, max_position_embeddings=1024, tie_word_embeddings=False,
                         bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    Qwen3ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--generate-batch-size", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    tokenizer = build_char_tokenizer()
    root = tempfile.mkdtemp(prefix="scoring_overlap_")
    student = save_model(os.path.join(root, "student"), tokenizer, 2, 256, 0)
    teacher_path = save_model(os.path.join(root, "teacher"), tokenizer, 4, 256, 1)
    max_len = 32 + args.max_new_tokens + 1
    server = start_teacher_server(teacher_path, args.top_k, "float32", kv_cache_memory_bytes=2**28, max_model_len=max_len)
    url = server.url
    engine = VLLMEngine(student, VLLMSettings(kv_cache_memory_bytes=2**28, max_model_len=max_len))
    teacher = ServerTeacher(url, teacher_path, TeacherServing())
    rollout = RolloutConfig(num_samples=args.samples, max_new_tokens=args.max_new_tokens, engine="vllm",
                            generate_batch_size=args.generate_batch_size)
    collector = RolloutCollector(rollout, tokenizer, engine, teacher, ScoringSettings(top_k=args.top_k))
    policy = CausalLMScorer(Qwen3ForCausalLM.from_pretrained(student, dtype=torch.float32))
    torch.manual_seed(2)
    texts = ["".join(chr(ord("a") + int(c)) for c in torch.randint(0, 26, (24,))) + f" {i}+{i}=?" for i in range(args.prompts)]
    rows = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    P = max(map(len, rows))
    batch = {"prompt_ids": torch.tensor([[tokenizer.pad_token_id] * (P - len(r)) + r for r in rows]),
             "prompt_mask": torch.tensor([[False] * (P - len(r)) + [True] * len(r) for r in rows]),
             "answers": ["0"] * args.prompts, "num_minibatches": 1}
    results = {"after": [], "parts_after": [], "beside": []}
    try:
        for round_ in range(args.rounds + 1):  # the first round warms up and is dropped
            for way in results:
                teacher.scores_while_generating = way == "beside"
                if way == "parts_after":  # generated in parts as beside, but scored after: the parts' own cost
                    collector.rollout_rows = lambda batch, policy, generator, on_part: RolloutCollector.rollout_rows(
                        collector, batch, policy, generator, lambda first, rows: None)
                else:
                    collector.__dict__.pop("rollout_rows", None)
                start = time.perf_counter()
                _, stats = collector.collect(batch, 0, policy, torch.Generator().manual_seed(round_))
                seconds = time.perf_counter() - start
                if round_:
                    results[way].append({"seconds": seconds, "generate_s": stats["perf/generate_s"],
                                         "teacher_s": stats["perf/teacher_s"]})
    finally:
        collector.close()
        server.close()
    ways = {way: {"best_s": round(min(r["seconds"] for r in runs), 3),
                  "seconds": [round(r["seconds"], 3) for r in runs],
                  "generate_s": [round(r["generate_s"], 3) for r in runs],
                  "teacher_wait_s": [round(r["teacher_s"], 3) for r in runs]} for way, runs in results.items()}
    print(json.dumps({
        "environment": {"torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
                        "threads": torch.get_num_threads()},
        "rows": args.prompts * args.samples, "max_new_tokens": args.max_new_tokens,
        "generate_batch_size": args.generate_batch_size, "top_k": args.top_k, "ways": ways,
        "after_over_beside": round(ways["after"]["best_s"] / ways["beside"]["best_s"], 2),
    }))


if __name__ == "__main__":
    main()
