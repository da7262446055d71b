"""Peak memory of student log-probs + backward: chunked (`lit_opd.logprobs.token_logprobs`) against
the naive full-logits computation, as the response length T grows.

Prints one JSON object. For every (method, T) it reports
  saved_for_backward_bytes  bytes autograd keeps for the backward pass, beyond the hidden states and
                            the lm_head weight themselves (summed with torch.autograd.graph.saved_tensors_hooks);
  peak_bytes                CUDA: torch.cuda.max_memory_allocated over the forward + backward, minus what
                            was allocated before; CPU: growth of the resident set (ru_maxrss) over the
                            forward + backward, each measurement in a fresh process so peaks do not mix.
The naive path holds [B·T, V] fp32 logits (and their log-softmax), so it grows with T·V; the chunked
path holds one [chunk_size, V] block at a time.

    python benchmarks/logprobs_memory.py                       # V = 32768, T = 512 .. 4096
    python benchmarks/logprobs_memory.py --lengths 1024 8192 --device cuda
"""

import argparse
import json
import resource
import subprocess
import sys

import torch

from lit_opd.logprobs import token_logprobs


def naive_token_logprobs(hidden, weight, tokens):
    logits = (hidden @ weight.T).float()
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)


METHODS = {
    "naive": lambda hidden, weight, tokens, chunk_size: naive_token_logprobs(hidden, weight, tokens),
    "chunked": token_logprobs,
}


def measure(method: str, length: int, args) -> dict:
    """Forward + backward of one method at one length, in this process."""
    device = torch.device(args.device)
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(args.batch, length, args.hidden, generator=g, device=device, requires_grad=True)
    weight = torch.randn(args.vocab, args.hidden, generator=g, device=device) / args.hidden**0.5
    weight.requires_grad_()
    tokens = torch.randint(0, args.vocab, (args.batch, length), generator=g, device=device)
    inputs = {hidden.data_ptr(), weight.data_ptr()}
    saved = []

    def pack(tensor):
        if tensor.data_ptr() not in inputs:
            saved.append(tensor.numel() * tensor.element_size())
        return tensor

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logp = METHODS[method](hidden, weight, tokens, args.chunk_size)
    (-logp.mean()).backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {
        "method": method,
        "T": length,
        "tokens": args.batch * length,
        "saved_for_backward_bytes": sum(saved),
        "peak_bytes": peak,
        "full_logits_bytes": args.batch * length * args.vocab * 4,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "T"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker[0], int(args.worker[1]), args)))
        return
    results = []
    for method in METHODS:
        for length in args.lengths:
            # A fresh process per measurement: ru_maxrss (CPU) only ever grows within a process.
            command = [sys.executable, __file__, "--worker", method, str(length)]
            for flag in ("vocab", "hidden", "batch", "chunk_size", "device"):
                command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
    chunked = [r for r in results if r["method"] == "chunked"]
    naive = [r for r in results if r["method"] == "naive"]
    print(json.dumps({
        "device": args.device,
        "torch": torch.__version__,
        "vocab": args.vocab,
        "hidden": args.hidden,
        "batch": args.batch,
        "chunk_size": args.chunk_size,
        "peak_measure": "torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else "ru_maxrss growth",
        "results": results,
        "peak_growth_shortest_to_longest": {
            "chunked": chunked[-1]["peak_bytes"] / max(chunked[0]["peak_bytes"], 1),
            "naive": naive[-1]["peak_bytes"] / max(naive[0]["peak_bytes"], 1),
            "length": args.lengths[-1] / args.lengths[0],
        },
    }, indent=2))


if __name__ == "__main__":
    main()
