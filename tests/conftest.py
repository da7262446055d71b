"""Shared fixtures: a real character tokenizer and tiny Qwen3 models saved as HF checkpoints."""

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


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
    yield
