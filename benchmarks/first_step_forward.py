"""What reading a rollout batch's behaviour log-probs off its first step's forward saves (16b9a09):
one no-grad forward over a mini-batch per rollout batch, against the optimiser steps' forwards and
backwards, at a long-response shape and the paper configs' proportions.

Prints one JSON object: the median seconds of a no-grad scoring forward (`forward_s`) and of a
training forward + backward (`forward_backward_s`) of the same rows, and `extra_forward_share` =
forward_s / (steps_per_rollout · forward_backward_s), the share of the optimiser steps' time the
extra forward would add (configs/defaults.yaml: reuse 2 × 2 mini-batches = 4 steps per rollout
batch; gradient checkpointing on, as there). The model keeps Qwen3-1.7B's ratio of decoder-layer
to lm_head weights (~4.5 : 1) at a CPU size.

    python benchmarks/first_step_forward.py
    python benchmarks/first_step_forward.py --response 2048 --no-gradient-checkpointing
"""

import argparse
import json
import statistics
import time

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from lit_opd.logprobs import CausalLMScorer


def build_model(args) -> CausalLMScorer:
    config = Qwen3Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=args.hidden // 4, max_position_embeddings=args.prompt + args.response,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return CausalLMScorer(model.train(), chunk_size=1024)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--response", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=6144)
    parser.add_argument("--steps-per-rollout", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    args = parser.parse_args()
    scorer = build_model(args)
    ids = torch.randint(0, args.vocab, (args.rows, args.prompt + args.response))
    mask = torch.ones_like(ids, dtype=torch.bool)

    def forward():
        with torch.no_grad():
            scorer(ids, mask, args.response)

    def forward_backward():
        scorer(ids, mask, args.response)["logp"].mean().backward()
        scorer.zero_grad(set_to_none=True)

    forward_s, forward_backward_s = timed(forward, args.repeats), timed(forward_backward, args.repeats)
    print(json.dumps({
        "shape": {"rows": args.rows, "prompt": args.prompt, "response": args.response},
        "model": {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab},
        "gradient_checkpointing": args.gradient_checkpointing,
        "threads": torch.get_num_threads(),
        "forward_s": round(forward_s, 4),
        "forward_backward_s": round(forward_backward_s, 4),
        "steps_per_rollout": args.steps_per_rollout,
        "extra_forward_share": round(forward_s / (args.steps_per_rollout * forward_backward_s), 4),
    }))


if __name__ == "__main__":
    main()
