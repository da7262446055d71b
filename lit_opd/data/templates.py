"""How a math problem becomes a prompt string, and which tokens end a response."""

import re
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>")
# DAPO-Math-17k's prompt around each problem, asking for an "Answer: ..." last line.
DAPO_PROMPT = re.compile(
    r"\ASolve the following math problem step by step\. The last line of your response should be of the form "
    r"Answer: \$Answer \(without quotes\) where \$Answer is the answer to the problem\.\n\n(?P<problem>.*)"
    r"\n\nRemember to put your answer on its own line after \"Answer:\"\.?\s*\Z",
    re.DOTALL,
)


def dapo_problem(prompt: str) -> str | None:
    """The problem inside a DAPO-Math-17k prompt (None if `prompt` is not one)."""
    match = DAPO_PROMPT.match(prompt)
    return match["problem"].strip() if match else None


@dataclass(frozen=True)
class PromptTemplate:
    """chat=True: the tokenizer's chat template with one user turn "{problem}\\n{instruction}"
    and the assistant turn opened. chat=False: a plain template for base models,
    "{problem}\\n{instruction}\\n\\nSolution:". enable_thinking: passed to the chat template
    (Qwen3's switch for its thinking block; None: the template's default)."""

    chat: bool = True
    instruction: str = MATH_INSTRUCTION
    enable_thinking: bool | None = None

    def render(self, tokenizer: PreTrainedTokenizerBase, problem: str) -> str:
        content = f"{problem}\n{self.instruction}" if self.instruction else problem
        if not self.chat:
            return f"{content}\n\nSolution:"
        if not tokenizer.chat_template:
            raise ValueError(
                f"tokenizer {tokenizer.name_or_path!r} has no chat template: set data.chat_template=false "
                "(the plain template, for base models; evaluation alone: the PassAtKEvaluation callback's chat: "
                "false) or use a tokenizer with one"
            )
        messages = [{"role": "user", "content": content}]
        switches = {} if self.enable_thinking is None else {"enable_thinking": self.enable_thinking}
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **switches)


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
