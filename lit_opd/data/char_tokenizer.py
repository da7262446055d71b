"""A real HF fast tokenizer over characters, built offline: used by the quickstart's tiny models
and the tests. It has a Qwen-style chat template and special tokens, so every code path that
serves Qwen3 (chat template, EOS handling, padding) runs on it unchanged."""

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
MULTI_CHAR_TOKENS = ["\\boxed{", "\n\n"]


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """Printable ASCII + newline as single-character tokens, plus `\\boxed{` and a blank line
    ("\\n\\n", the span delimiter) as whole tokens. pad = `<|endoftext|>`, eos = `<|im_end|>`."""
    chars = list(string.printable.replace("\x0b", "").replace("\x0c", "").replace("\r", ""))
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + chars)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
        padding_side="left",
    )
    fast.add_tokens(MULTI_CHAR_TOKENS)
    fast.chat_template = CHAT_TEMPLATE
    return fast
