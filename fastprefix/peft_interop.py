"""`from_peft(peft_model)`: run a PEFT prefix-tuning model on fastprefix's patched attention.

PEFT 0.21 turns its prompt encoder's output into a per-row copy of the prefix ([B, P, 2 * layers * token_dim],
`get_prompt`) and puts it in a `DynamicCache` that every layer concatenates with its sequence keys. Here
the prompt encoder is called once per forward on the prefix tokens alone and its output is viewed, without
a copy per row, as one [Hkv, P, D] key and value tensor per layer (PEFT's own layout: keys of layer l at
slot 2l, values at 2l + 1). The base model is patched (`patching.patch`) for as long as the returned module
is in use, so gradients reach PEFT's own parameters, gradient checkpointing works (the prefix is not in
the cache that checkpointing disables), and `generate` keeps the prefix out of its cache.
"""

from __future__ import annotations

import torch
from torch import nn

from .patching import patch
from .prefix import Prefix
from .validate import validate


def _reentrant_checkpointing(model: nn.Module) -> bool:
    """True if some layer will run under `torch.utils.checkpoint(..., use_reentrant=True)`."""
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False):
            keywords = getattr(getattr(module, "_gradient_checkpointing_func", None), "keywords", {})
            if keywords.get("use_reentrant", False):
                return True
    return False


class PeftPrefixModel(nn.Module):
    """A PEFT prefix-tuning causal LM whose prefix runs through fastprefix. Built by `from_peft`.

    `model(...)` takes the arguments of PEFT's forward and returns the base model's output (logits, loss);
    `model.generate(...)` is the base model's `generate` with the prefix. `peft_model` stays the owner of
    the parameters: an optimizer on `peft_model.parameters()` trains this module. While this module is in
    use, call the model through it (PEFT's own forward would add its prefix on top of fastprefix's and is
    refused); `unpatch()` hands `peft_model` back unchanged.
    """

    def __init__(self, peft_model):
        super().__init__()
        self.peft_model = peft_model
        with torch.no_grad():
            self._handle = patch(peft_model.get_base_model(), self.prefix())
        self._guard = peft_model.register_forward_pre_hook(_refuse_direct_call)

    def prefix(self) -> Prefix:
        """The prefix of PEFT's active adapter: one [Hkv, P, D] key and value tensor per layer, computed once
        (a view of the prompt encoder's output, differentiable with respect to its parameters)."""
        peft_model = self.peft_model
        config = peft_model.active_peft_config
        encoder = peft_model.prompt_encoder[peft_model.active_adapter]
        P, layers, heads = config.num_virtual_tokens, config.num_layers, config.num_attention_heads
        if config.inference_mode:
            # As in PEFT's get_prompt: in inference mode the embedding holds the prefix itself.
            flat = encoder.embedding.weight
        else:
            tokens = peft_model.prompt_tokens[peft_model.active_adapter][:P].to(encoder.embedding.weight.device)
            flat = encoder(tokens)
        if peft_model.base_model_torch_dtype is not None:
            flat = flat.to(peft_model.base_model_torch_dtype)
        kv = flat.view(P, 2 * layers, heads, config.token_dim // heads).permute(1, 2, 0, 3)
        return Prefix(list(kv[0::2]), list(kv[1::2]))

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
        self._require_patched()
        if task_ids is not None:
            raise ValueError("fastprefix: `task_ids` select a task of multitask prompt tuning; prefix tuning has "
                             "none. Drop the argument.")
        base = self.peft_model.get_base_model()
        if base.training and torch.is_grad_enabled() and _reentrant_checkpointing(base):
            raise RuntimeError(
                "fastprefix: gradient checkpointing with use_reentrant=True runs a separate backward per layer, "
                "and each would go through the prompt encoder that computed the prefix (autograd frees it after "
                "the first). Enable it as "
                "model.gradient_checkpointing_enable() (non-reentrant, the transformers default) or with "
                "gradient_checkpointing_kwargs={'use_reentrant': False}."
            )
        self._handle.set_prefix(self.prefix())
        return base(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, labels=labels,
                    output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                    return_dict=return_dict, **kwargs)

    def generate(self, *args, **kwargs):
        """The base model's `generate` attending to the current prefix (computed once, without gradient)."""
        self._require_patched()
        with torch.no_grad():
            self._handle.set_prefix(self.prefix())
        return self.peft_model.get_base_model().generate(*args, **kwargs)

    def unpatch(self) -> None:
        """Restore `peft_model` and its base model exactly; this module can no longer be called."""
        self._require_patched()
        self._handle.unpatch()
        self._guard.remove()

    def _require_patched(self) -> None:
        if not self._handle.active:
            raise RuntimeError("fastprefix: this model was unpatched; call fastprefix.from_peft(peft_model) again.")


def _refuse_direct_call(module, args):
    raise RuntimeError(
        "fastprefix: this PeftModel is patched by fastprefix.from_peft; PEFT's own forward would add its prefix "
        "a second time. Call the module from_peft returned, or its unpatch() first."
    )


def from_peft(peft_model) -> PeftPrefixModel:
    """Wrap a `PeftModelForCausalLM` with a `PrefixTuningConfig` so it runs on fastprefix (see
    `PeftPrefixModel`). Checks the config against the model first (`validate`)."""
    from peft import PeftModelForCausalLM

    if not isinstance(peft_model, PeftModelForCausalLM):
        raise TypeError(
            f"fastprefix.from_peft: expected a peft PeftModelForCausalLM (get_peft_model(model, "
            f"PrefixTuningConfig(task_type='CAUSAL_LM', ...))), got {type(peft_model).__name__}."
        )
    validate(peft_model.active_peft_config, peft_model.get_base_model())
    return PeftPrefixModel(peft_model)
