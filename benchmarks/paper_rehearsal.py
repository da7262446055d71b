"""The paper path rehearsed at real shapes on CPU: every paper config through `lit-opd fit`, as
shipped except for what this machine forces.

As shipped: the config file over defaults.yaml (its rollout engine, bf16-mixed precision, float32
master weights, the teacher's dtype, gradient checkpointing, the 32k-token micro-batch budget, the
gates, phased teacher sampling, pass@k evaluation on the rollout engine, TensorBoard, checkpoints).
Forced by the machine: CPU; a Qwen3-0.6B-shaped student and a Qwen3-1.7B-shaped teacher with
random weights (vocabulary 151,936, tied embeddings as in both real models; saved in bfloat16 as
the hub's are); a tokenizer with Qwen3's special tokens at Qwen3's ids (151,643 <|endoftext|>,
151,644 <|im_start|>, 151,645 <|im_end|>, ... 151,668 </think>), the Qwen chat format with the
`enable_thinking` switch and one token per character for text; 4 DAPO-layout prompts (chat
messages with DAPO's "Answer:" prompt, `reward_model.ground_truth`); 2 prompts × 2 samples a
rollout batch, 16 new tokens; 2 optimiser steps; evaluation of 2 AIME24 problems × n=2 at the
fit's end; vLLM's KV cache given in bytes (on CPU its memory share is of host memory); each
config's files in a directory of its own, removed after it.

Each config runs in a process of its own; per config: rc, seconds, peak_rss_gib (that process's
peak resident set) and the last train/loss. Prints one JSON line per config and a summary line.

    .venv-vllm/bin/python benchmarks/paper_rehearsal.py                 # real shapes, ~minutes a config
    python benchmarks/paper_rehearsal.py --shape small --engine static  # the test suite's run
"""

import argparse
import json
import resource
import shutil
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

PAPER_CONFIGS = ["opd_block64", "topk_lsm_block64", "sg_opd", "sg_topk_lsm", "gkd"]
QWEN3 = dict(vocab_size=151_936, tie_word_embeddings=True, max_position_embeddings=40_960, rms_norm_eps=1e-6,
             rope_parameters={"rope_type": "default", "rope_theta": 1e6})
SHAPES = {
    "real": {
        "student": dict(QWEN3, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                        num_attention_heads=16, num_key_value_heads=8, head_dim=128),
        "teacher": dict(QWEN3, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                        num_attention_heads=16, num_key_value_heads=8, head_dim=128),
    },
    "small": {  # head_dim 32: the smallest vLLM's CPU attention takes
        "student": dict(QWEN3, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=32),
        "teacher": dict(QWEN3, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=32),
    },
}
QWEN3_SPECIAL_TOKENS = [  # ids 151,643 to 151,668, in Qwen3's order
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
    "<think>", "</think>",
]
FIRST_SPECIAL_ID = 151_643
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
DAPO_PROMPT = ("Solve the following math problem step by step. The last line of your response should be of the form "
               "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{problem}\n\n"
               "Remember to put your answer on its own line after \"Answer:\".")


def qwen3_like_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable character, unused ids up to 151,642, then Qwen3's special tokens at
    Qwen3's ids; pad <|endoftext|>, eos <|im_end|>, left padding, the Qwen chat format."""
    chars = list(string.printable.replace("\x0b", "").replace("\x0c", "").replace("\r", ""))
    vocab = {token: i for i, token in enumerate(["<unk>", *chars])}
    vocab.update({f"<|unused_{i}|>": i for i in range(len(vocab), FIRST_SPECIAL_ID)})
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", padding_side="left")
    fast.add_special_tokens({"additional_special_tokens": QWEN3_SPECIAL_TOKENS})
    fast.pad_token, fast.eos_token = "<|endoftext|>", "<|im_end|>"
    fast.chat_template = QWEN_CHAT_TEMPLATE
    assert fast.convert_tokens_to_ids("</think>") == FIRST_SPECIAL_ID + len(QWEN3_SPECIAL_TOKENS) - 1
    return fast


def write_inputs(directory: Path, shape: dict) -> dict[str, str]:
    """The random-weight student and teacher (bfloat16 files, each with the tokenizer) and a DAPO-layout JSONL."""
    tokenizer = qwen3_like_tokenizer()
    paths = {}
    for seed, role in enumerate(("student", "teacher")):
        config = Qwen3Config(**shape[role], bos_token_id=tokenizer.pad_token_id, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        torch.manual_seed(seed)
        Qwen3ForCausalLM(config).to(torch.bfloat16).save_pretrained(directory / role)
        tokenizer.save_pretrained(directory / role)
        paths[role] = str(directory / role)
    rows = [{"data_source": "math_dapo", "prompt": [{"content": DAPO_PROMPT.format(problem=f"What is {i} + {i + 1}?"),
                                                     "role": "user"}],
             "ability": "MATH", "reward_model": {"ground_truth": str(2 * i + 1), "style": "rule-lang"},
             "extra_info": {"index": f"id-{i}"}} for i in range(4)]
    paths["data"] = str(directory / "dapo.jsonl")
    Path(paths["data"]).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return paths


def machine_overrides(directory: Path, kv_cache_bytes: int) -> str:
    """A config laid over the paper config: what a 2-core CPU forces, nothing else. The shipped
    callbacks stay (checkpoints every 25 steps and of the last step, the learning-rate monitor, the
    final student's export); only the evaluation is smaller, and everything is written in `directory`."""
    overrides = {
        "trainer": {
            "accelerator": "cpu", "max_steps": 2,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(directory / "runs"), "name": "rehearsal"}},
            "callbacks": [
                {"class_path": "lit_opd.callbacks.PassAtKEvaluation",
                 "init_args": {"benchmarks": ["aime24"], "max_problems": 2, "n": 2, "ks": [1, 2],
                               "max_new_tokens": 16, "batch_size": 4, "verify_workers": 1, "progress": False}},
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(directory / "checkpoints"), "save_last": True, "every_n_train_steps": 25}},
                {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor"},
                {"class_path": "lit_opd.callbacks.ExportStudent",
                 "init_args": {"dirpath": str(directory / "student"), "dtype": "original"}},
            ],
        },
        "model": {"init_args": {"rollout": {"num_samples": 2, "max_new_tokens": 16,
                                            "vllm": {"kv_cache_memory_bytes": kv_cache_bytes}}}},
        "data": {"prompts_per_rollout": 2},
    }
    path = directory / "machine.yaml"
    path.write_text(yaml.safe_dump(overrides))
    return str(path)


def fit_overrides(paths: dict, engine: str | None) -> list[str]:
    args = [f"--model.init_args.student={paths['student']}", f"--model.init_args.teacher={paths['teacher']}",
            f"--data.tokenizer={paths['student']}", f"--data.train_data={paths['data']}"]
    return args + ([f"--model.init_args.rollout.engine={engine}"] if engine else [])


def run_child(config: str, overrides: str, args: list[str]) -> None:
    """`lit-opd fit --config CONFIG --config OVERRIDES ARGS` in this process; prints its peak
    resident set and last train/loss."""
    from lit_opd.lightning_cli import fit_run

    torch.set_num_threads(2)
    cli = fit_run([config, overrides], args)
    loss = cli.trainer.callback_metrics.get("train/loss")
    print(json.dumps({"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                      "steps": cli.trainer.global_step, "loss": None if loss is None else round(float(loss), 4)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="real")
    parser.add_argument("--configs", nargs="+", default=PAPER_CONFIGS)
    parser.add_argument("--engine", default=None, help="rollout.engine override (default: as shipped)")
    parser.add_argument("--kv-cache-gib", type=float, default=1.0, help="vLLM's KV cache (CPU backend)")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args.child[0], args.child[1], args.child[2:])
        return
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        paths = write_inputs(directory, SHAPES[args.shape])
        for config in args.configs:
            run_dir = directory / config  # its checkpoints (the student with AdamW: 9.6 GB at the real shape) go with it
            run_dir.mkdir()
            overrides = machine_overrides(run_dir, int(args.kv_cache_gib * 2**30))
            started = time.perf_counter()
            command = [sys.executable, __file__, "--child", config, overrides, *fit_overrides(paths, args.engine)]
            done = subprocess.run(command, capture_output=True, text=True, cwd=run_dir)
            shutil.rmtree(run_dir)
            result = {"config": config, "shape": args.shape, "engine": args.engine or "as shipped", "rc": done.returncode,
                      "seconds": round(time.perf_counter() - started, 1)}
            if done.returncode == 0:
                result.update(json.loads(done.stdout.strip().splitlines()[-1]))
            else:
                result["error"] = done.stderr.strip().splitlines()[-1:] if done.stderr.strip() else []
                print(done.stderr[-4000:], file=sys.stderr)
            results.append(result)
            print(json.dumps(result), flush=True)
    failed = [r["config"] for r in results if r["rc"] != 0]
    print(json.dumps({"configs": len(results), "failed": failed}))
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
