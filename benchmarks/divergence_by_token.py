"""Where the student-teacher divergence sits in a response: the sampled reverse KL
log π_S(y_t) − log π_T(y_t) on the student's own samples, split into digit tokens and the rest.
Prints one JSON object: tokens per response, the digits' share of the tokens, the mean reverse KL
on digits and on other tokens, and the digits' share of the total. For a task prepared by
`lit-opd quickstart` (its models/ and data/):

    python benchmarks/divergence_by_token.py --root granular --problems 32 --samples 2
"""

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lit_opd.data.benchmarks import load_problems
from lit_opd.logprobs import CausalLMScorer
from lit_opd.quickstart import QuickstartSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="a quickstart output directory (models/, data/)")
    parser.add_argument("--problems", type=int, default=32, help="the first N held-out problems")
    parser.add_argument("--samples", type=int, default=2, help="student samples per problem")
    parser.add_argument("--max-new-tokens", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    root = Path(args.root)
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(root / "models" / "student", padding_side="left")
    student = AutoModelForCausalLM.from_pretrained(root / "models" / "student").eval()
    teacher = AutoModelForCausalLM.from_pretrained(root / "models" / "teacher").eval()
    problems = load_problems(str(root / "data" / "heldout.jsonl"))[: args.problems]
    prompts = [QuickstartSettings().template.render(tokenizer, p.problem) for p in problems]
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        sequences = student.generate(**encoded, do_sample=True, temperature=1.0, max_new_tokens=args.max_new_tokens,
                                     num_return_sequences=args.samples, pad_token_id=tokenizer.pad_token_id)
        mask = sequences != tokenizer.pad_token_id
        start = encoded.input_ids.shape[1]
        length = sequences.shape[1] - start
        divergence = (CausalLMScorer(student)(sequences, mask, length)["logp"]
                      - CausalLMScorer(teacher)(sequences, mask, length)["logp"])
    response, in_response = sequences[:, start:], mask[:, start:]
    digits = torch.tensor([[tokenizer.decode([int(t)]).isdigit() for t in row] for row in response]) & in_response
    others = in_response & ~digits
    print(json.dumps({
        "responses": len(response),
        "tokens_per_response": in_response.sum(1).float().mean().item(),
        "digit_fraction": (digits.sum() / in_response.sum()).item(),
        "reverse_kl_digit_mean": ((divergence * digits).sum() / digits.sum()).item(),
        "reverse_kl_other_mean": ((divergence * others).sum() / others.sum()).item(),
        "digit_share_of_reverse_kl": ((divergence * digits).sum() / (divergence * in_response).sum()).item(),
    }, indent=2))


if __name__ == "__main__":
    main()
