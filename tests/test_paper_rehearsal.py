"""benchmarks/paper_rehearsal.py at its small shape: every paper config through `lit-opd fit` as
shipped (vLLM rollouts and evaluation, bf16-mixed, the 32k budget, gradient checkpointing, the
gates and teacher phases) on tiny random models with Qwen3's special tokens and DAPO-layout
prompts. Needs vLLM (tests/vllm_env.sh runs it); the real-shape run is recorded in RESULTS.md."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "paper_rehearsal.py"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (tests/vllm_env.sh)")
def test_every_paper_config_runs_as_shipped_at_the_small_shape():
    done = subprocess.run([sys.executable, str(SCRIPT), "--shape", "small"], capture_output=True, text=True,
                          timeout=1800)
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0, (lines, done.stderr[-3000:])
    runs = {line["config"]: line for line in lines if "config" in line}
    assert set(runs) == {"opd_block64", "topk_lsm_block64", "sg_opd", "sg_topk_lsm", "gkd"}
    for config, run in runs.items():
        assert run["engine"] == "as shipped" and run["steps"] == 2 and run["loss"] is not None, config


def test_the_rehearsal_tokenizer_has_qwen3_s_special_tokens_at_their_ids():
    sys.path.insert(0, str(SCRIPT.parent))
    from paper_rehearsal import qwen3_like_tokenizer

    tokenizer = qwen3_like_tokenizer()
    assert [tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "</think>")] == [
        151_643, 151_644, 151_645, 151_668]
    assert tokenizer.pad_token_id == 151_643 and tokenizer.eos_token_id == 151_645 and len(tokenizer) == 151_669
    text = tokenizer.apply_chat_template([{"role": "user", "content": "1+1?"}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=False)
    assert text == "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert tokenizer.decode(tokenizer("1+1?")["input_ids"]) == "1+1?"
