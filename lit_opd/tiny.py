"""Tiny Qwen3-architecture models, built in-process: the quickstart's teacher and student and the
tests' `tiny_lm`. Real `transformers` classes, only small."""

import torch
from transformers import PreTrainedTokenizerBase, Qwen3Config, Qwen3ForCausalLM


def tiny_qwen3(
    tokenizer: PreTrainedTokenizerBase,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    max_positions: int = 1024,
    seed: int = 0,
) -> Qwen3ForCausalLM:
    """A randomly initialised Qwen3ForCausalLM for `tokenizer`. Like Qwen3, the embedding has
    more rows than the tokenizer has tokens (rounded up to a multiple of 64): padding rows."""
    vocab_size = -(-len(tokenizer) // 64) * 64
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Qwen3ForCausalLM(config)
