"""How a math problem becomes a prompt string, and which tokens end a response."""

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>")


@dataclass(frozen=True)
class PromptTemplate:
    """chat=True: the tokenizer's chat template with one user turn "{problem}\\n{instruction}"
    and the assistant turn opened. chat=False: a plain template for base models,
    "{problem}\\n{instruction}\\n\\nSolution:"."""

    chat: bool = True
    instruction: str = MATH_INSTRUCTION

    def render(self, tokenizer: PreTrainedTokenizerBase, problem: str) -> str:
        content = f"{problem}\n{self.instruction}" if self.instruction else problem
        if not self.chat:
            return f"{content}\n\nSolution:"
        if not tokenizer.chat_template:
            raise ValueError(
                f"tokenizer {tokenizer.name_or_path!r} has no chat template: set template.chat=false "
                "(plain template for base models) or use a tokenizer with one"
            )
        messages = [{"role": "user", "content": content}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def eos_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokenizer's EOS plus the end-of-turn tokens it knows (Qwen's <|im_end|> and
    <|endoftext|>, Llama's <|eot_id|>): a response stops at the first of any of them."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids.update(vocab[token] for token in END_TOKENS if token in vocab)
    if not ids:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token")
    return sorted(ids)


def datamodule_template(trainer) -> PromptTemplate:
    """The prompt template of `trainer`'s DataModule (the default template without one)."""
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    return getattr(datamodule, "template", PromptTemplate())
