"""SFTModule / SFTDataModule: completion-only loss, a real Trainer that learns, HF round trip."""

import json

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lit_opd.modules.sft import IGNORE_INDEX, SFTDataModule, SFTModule, completion_nll, sft_collate

ROWS = [
    {"id": "a", "problem": "Compute 2 + 3.", "answer": "5", "solution": "2 + 3 = 5\n\n\\boxed{5}"},
    {"id": "b", "problem": "Compute 4 * 2 - 1.", "answer": "7", "solution": "4 * 2 = 8\n\n8 - 1 = 7\n\n\\boxed{7}"},
]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_collate_masks_prompt_and_padding():
    batch = sft_collate([([5, 6], [7, 8]), ([5], [9])], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [5, 9, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 7, 8], [IGNORE_INDEX, 9, IGNORE_INDEX, IGNORE_INDEX]]


def test_completion_nll_is_a_token_mean_over_completion_positions():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    labels = torch.tensor([[IGNORE_INDEX, 4, 5], [7, IGNORE_INDEX, IGNORE_INDEX]])
    assert completion_nll(logp, labels).item() == pytest.approx((2 + 3 + 4) / 3)
    with pytest.raises(ValueError, match="no completion token"):
        completion_nll(logp, torch.full_like(labels, IGNORE_INDEX))


def test_loss_counts_only_completion_tokens(tiny_checkpoints, char_tokenizer):
    """On one row: the loss is −mean log p of the completion tokens under the model's own full
    logits, and differs from the mean over all tokens (so the prompt mask matters here)."""
    module = SFTModule(tiny_checkpoints["student"])
    prompt = char_tokenizer("Q: 2 + 3\n", add_special_tokens=False)["input_ids"]
    completion = char_tokenizer("\\boxed{5}", add_special_tokens=False)["input_ids"] + [char_tokenizer.eos_token_id]
    batch = sft_collate([(prompt, completion)], char_tokenizer.pad_token_id)
    loss = module.loss(batch)

    ids = batch["input_ids"]
    logits = module.model(input_ids=ids).logits[0, :-1].double()
    token_logp = torch.log_softmax(logits, dim=-1).gather(1, ids[0, 1:, None])[:, 0]
    completion_positions = slice(len(prompt) - 1, None)  # position t predicts token t + 1
    assert loss.item() == pytest.approx(-token_logp[completion_positions].mean().item(), rel=1e-5)
    assert loss.item() != pytest.approx(-token_logp.mean().item(), rel=1e-3)


def test_trainer_steps_reduce_the_loss_and_checkpoint_round_trips(tmp_path, tiny_checkpoints, char_tokenizer):
    train = write_rows(tmp_path / "train.jsonl", ROWS)
    data = SFTDataModule(tiny_checkpoints["student"], train, val_data=train, instruction="", batch_size=2, max_length=128)
    module = SFTModule(tiny_checkpoints["student"], lr=1e-2, warmup_steps=2)
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    with torch.no_grad():
        before = module.loss(batch).item()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=15, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )
    trainer.fit(module, datamodule=data)
    with torch.no_grad():
        after = module.loss(batch).item()
    assert after < 0.5 * before
    assert trainer.callback_metrics["train/loss"].item() > 0

    saved = module.save_pretrained(tmp_path / "sft")
    model = AutoModelForCausalLM.from_pretrained(saved).eval()
    tokenizer = AutoTokenizer.from_pretrained(saved)
    text = ROWS[1]["solution"]
    assert tokenizer(text)["input_ids"] == char_tokenizer(text)["input_ids"]
    assert tokenizer.chat_template == char_tokenizer.chat_template
    module.model.eval()
    with torch.no_grad():
        ids = batch["input_ids"]
        torch.testing.assert_close(model(input_ids=ids).logits, module.model(input_ids=ids).logits)


def test_datamodule_renders_prompts_and_appends_eos(tmp_path, tiny_checkpoints, char_tokenizer):
    train = write_rows(tmp_path / "train.jsonl", ROWS)
    data = SFTDataModule(tiny_checkpoints["student"], train, instruction="", batch_size=2)
    data.setup("fit")
    prompt, completion = data.train_examples[0]
    assert char_tokenizer.decode(prompt) == "<|im_start|>user\nCompute 2 + 3.<|im_end|>\n<|im_start|>assistant\n"
    assert char_tokenizer.decode(completion) == ROWS[0]["solution"] + "<|im_end|>"


def test_datamodule_drops_long_rows_and_names_bad_ones(tmp_path, tiny_checkpoints):
    train = write_rows(tmp_path / "train.jsonl", ROWS)
    data = SFTDataModule(tiny_checkpoints["student"], train, instruction="", max_length=50)
    with pytest.warns(UserWarning, match="dropped 1 of 2 rows"):
        data.setup("fit")
    assert len(data.train_examples) == 1

    bad = write_rows(tmp_path / "bad.jsonl", [ROWS[0], {"id": "c", "problem": "Compute 1 + 1.", "answer": "2"}])
    with pytest.raises(ValueError, match=r"bad.jsonl:2: row has no field 'solution'"):
        SFTDataModule(tiny_checkpoints["student"], bad).setup("fit")
