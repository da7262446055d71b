"""Rollouts of a LoRA student through an engine that reads each layer's `.weight` (the
static-KV-cache engine): PEFT's layers answer `.weight` with the frozen base alone, so the
adapters would be silently ignored; the engine gets a plain copy holding the merged weights."""

from lit_opd.lora import copy_merged_weights, has_lora, merged_model
from lit_opd.rollout.engine import RolloutEngine


class MergedWeightsEngine(RolloutEngine):
    """`inner` generating with a plain HF copy of a LoRA student that holds its merged weights
    W + scale·B·A (`lora.merged_model`: one more copy of the weights, in the base's dtype). The copy
    is built at the first call and refreshed in place at every later one (`lora.copy_merged_weights`,
    a merge per call, the same on every rank): its tensors keep their addresses, so the static
    engine's captured CUDA graphs stay valid. A model without LoRA goes to `inner` as it is."""

    def __init__(self, inner: RolloutEngine):
        self.inner, self.paged, self.copy = inner, inner.paged, None

    def generate(self, model, prompt_ids, prompt_mask, sampling, eos_token_ids, pad_token_id, generator):
        if has_lora(model):
            if self.copy is None:
                self.copy = merged_model(model)
            else:
                copy_merged_weights(model, self.copy)
            model = self.copy
        return self.inner.generate(model, prompt_ids, prompt_mask, sampling, eos_token_ids, pad_token_id, generator)

    def close(self) -> None:
        self.copy = None
        self.inner.close()
