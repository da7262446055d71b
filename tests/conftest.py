"""Shared fixtures: a real character tokenizer, tiny Qwen3 models saved as HF checkpoints and
JSONL prompts files."""

import json
from collections.abc import Callable, Iterable

import pytest
import torch

from lit_opd.data.char_tokenizer import build_char_tokenizer
from lit_opd.tiny import tiny_qwen3


@pytest.fixture(scope="session")
def char_tokenizer():
    return build_char_tokenizer()


@pytest.fixture
def tiny_lm(char_tokenizer):
    """A two-layer Qwen3 with the character vocabulary, random weights, eval mode, float32."""
    return tiny_qwen3(char_tokenizer, hidden_size=32, num_layers=2, seed=0).eval()


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory, char_tokenizer):
    """{"student": dir, "teacher": dir}: tiny HF checkpoints with the tokenizer saved beside."""
    root = tmp_path_factory.mktemp("tiny_models")
    paths = {}
    for name, hidden, seed in (("student", 32, 0), ("teacher", 48, 1)):
        path = root / name
        tiny_qwen3(char_tokenizer, hidden_size=hidden, num_layers=2, seed=seed).save_pretrained(path)
        char_tokenizer.save_pretrained(path)
        paths[name] = str(path)
    return paths


@pytest.fixture(scope="session")
def write_prompts(tmp_path_factory) -> Callable[..., str]:
    """write_prompts(numbers, problem, answer) → the path of a new JSONL prompts file with a row
    {"problem": problem(i), "answer": str(answer(i))} for each i of `numbers` (by default the 8
    rows "i+i=?", answered 2i)."""

    def write(numbers: Iterable[int] = range(8), problem: Callable[[int], str] = lambda i: f"{i}+{i}=?",
              answer: Callable[[int], int] = lambda i: 2 * i) -> str:
        path = tmp_path_factory.mktemp("prompts") / "train.jsonl"
        path.write_text("".join(json.dumps({"problem": problem(i), "answer": str(answer(i))}) + "\n" for i in numbers))
        return str(path)

    return write


@pytest.fixture(scope="session")
def prompts_file(write_prompts) -> str:
    """24 prompts "i+(i+1)=?"."""
    return write_prompts(range(24), lambda i: f"{i}+{i + 1}=?", lambda i: 2 * i + 1)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
    yield
