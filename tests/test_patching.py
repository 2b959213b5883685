"""`patch` / `patched`: every registered family (LLaMA, T5) patches, runs and unpatches; on LLaMA-family models
positions, masks, caches, restore (T5 specifics are in test_t5_patching.py)."""

import gc
import weakref

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, PretrainedConfig, StaticCache

import fastprefix
from fastprefix.compat import cache_argument, cache_of
from fastprefix.models import REGISTRY, llama, t5
from fastprefix.testing import relative_error
from helpers.llama import checkpointed_layers, padded_batch, peft_twins, quiet, tiny_model
from helpers.t5 import batch as t5_batch
from helpers.t5 import t5_twins, tiny_t5


def random_prefix(model, P=5, batch=None, requires_grad=False):
    """Gaussian prefix keys/values of the model's geometry, [Hkv, P, D] (or [batch, Hkv, P, D])."""
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    shape = (config.num_key_value_heads, P, head_dim) if batch is None else (batch, config.num_key_value_heads,
                                                                             P, head_dim)
    make = lambda: [torch.randn(shape, requires_grad=requires_grad) for _ in range(config.num_hidden_layers)]
    return fastprefix.Prefix(make(), make())


def model_state(model):
    """Everything patching could leave behind: the attention implementation of every config (T5's stacks have
    their own), every module's attributes and the keys of every hook dictionary."""
    state = {}
    for name, module in model.named_modules():
        if isinstance(getattr(module, "config", None), PretrainedConfig):
            state[f"{name}.config"] = module.config._attn_implementation
        state[name] = sorted(vars(module))
        for attr, value in vars(module).items():
            if "hooks" in attr and isinstance(value, dict):
                state[f"{name}.{attr}"] = list(value)
    return state


@torch.no_grad()
def logits(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask).logits


def llama_case(model_type):
    """A model, inputs, fastprefix's view of PEFT's prefix and PEFT's model as the oracle."""
    model = tiny_model(model_type)
    ids, mask = padded_batch((9, 5), 9, torch.Generator().manual_seed(0))
    peft_model, oracle = peft_twins(model)
    with torch.no_grad():
        prefix = fastprefix.from_peft(peft_model).prefix()
    return model, dict(input_ids=ids, attention_mask=mask), prefix, oracle


def t5_case(model_type):
    """As `llama_case`; the prefix is read from the cache PEFT builds (decoder self-attention only)."""
    model = tiny_t5(model_type)
    inputs = t5_batch(torch.Generator().manual_seed(0))
    inputs["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(inputs.pop("labels"))
    _, oracle = t5_twins(model)
    with torch.no_grad():
        layers = oracle.get_prompt(1).self_attention_cache.layers
    prefix = fastprefix.Prefix([layer.keys[0] for layer in layers], [layer.values[0] for layer in layers])
    return model, inputs, prefix, oracle


CASES = {**dict.fromkeys(llama.FAMILY.model_types, llama_case), **dict.fromkeys(t5.FAMILY.model_types, t5_case)}


@pytest.mark.parametrize("model_type", sorted(REGISTRY))
def test_every_registered_family_patches_runs_and_unpatches(model_type):
    """Patched: PEFT's logits for the same prefix. Unpatched: bit-identical to before, nothing left over."""
    model, inputs, prefix, oracle = CASES[model_type](model_type)
    with torch.no_grad():
        before, state = model(**inputs).logits, model_state(model)
        handle = fastprefix.patch(model, prefix)
        out = model(**inputs).logits
        assert relative_error(out, oracle(**inputs).logits) < 1e-5
        assert relative_error(out, before) > 1e-2, "the prefix must change the output"
        handle.unpatch()
        assert torch.equal(model(**inputs).logits, before)
    assert model_state(model) == state


def test_unpatch_restores_the_original_attention_implementation():
    sdpa = tiny_model()
    eager = tiny_model(attn_implementation="eager")
    eager.load_state_dict(sdpa.state_dict())
    ids, mask = padded_batch((7, 4), 7, torch.Generator().manual_seed(1))
    prefix = random_prefix(sdpa)
    with fastprefix.patched(sdpa, prefix), fastprefix.patched(eager, prefix):
        assert relative_error(logits(eager, ids, mask), logits(sdpa, ids, mask)) < 1e-6
    assert (eager.config._attn_implementation, sdpa.config._attn_implementation) == ("eager", "sdpa")


def test_patching_twice_is_refused():
    model = tiny_model()
    with fastprefix.patched(model, random_prefix(model)):
        for target in (model, model.model):
            with pytest.raises(RuntimeError, match="already patched.*unpatch"):
                fastprefix.patch(target, random_prefix(model))


def test_unsupported_models_are_refused_with_the_supported_families():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(TypeError, match=r"model_type 'gpt2'.*LLaMA \(model_type llama, mistral, qwen2\)"):
        fastprefix.patch(gpt2, random_prefix(tiny_model()))
    with pytest.raises(TypeError, match="expected a transformers PreTrainedModel.*Supported families"):
        fastprefix.patch(torch.nn.Linear(2, 2), random_prefix(tiny_model()))
    peft_model, _ = peft_twins(tiny_model())
    with pytest.raises(TypeError, match="from_peft"):
        fastprefix.patch(peft_model, random_prefix(tiny_model()))


def test_prefix_not_fitting_the_model_is_refused():
    model = tiny_model(heads=4, kv_heads=2)
    three_layers = tiny_model(heads=4, kv_heads=2, layers=3)
    query_heads = tiny_model(heads=4, kv_heads=4)
    wide = tiny_model(heads=2, kv_heads=2)
    for other, match in ((three_layers, "3 layers but LlamaForCausalLM has 2"),
                         (query_heads, r"4 KV heads \(Hkv\) but LlamaForCausalLM has 2"),
                         (wide, r"32 head dim \(D\) but LlamaForCausalLM has 16")):
        with pytest.raises(ValueError, match=match):
            fastprefix.patch(model, random_prefix(other))
    prefix = random_prefix(model)
    doubles = fastprefix.Prefix([k.double() for k in prefix.keys], [v.double() for v in prefix.values])
    with pytest.raises(ValueError, match="torch.float64 on cpu but LlamaForCausalLM is torch.float32"):
        fastprefix.patch(model, doubles)
    with pytest.raises(TypeError, match="expected a fastprefix.Prefix"):
        fastprefix.patch(model, list(prefix.keys))
    assert model.config._attn_implementation == "sdpa"


def test_handle_lifecycle():
    model = tiny_model()
    handle = fastprefix.patch(model, random_prefix(model))
    with pytest.raises(ValueError, match="KV heads"):
        handle.set_prefix(random_prefix(tiny_model(kv_heads=4)))
    replacement = random_prefix(model, P=3)
    handle.set_prefix(replacement)
    assert handle.prefix is replacement
    handle.unpatch()
    for call in (handle.unpatch, lambda: handle.set_prefix(replacement)):
        with pytest.raises(RuntimeError, match="already unpatched"):
            call()


def test_a_patched_model_dropped_without_unpatching_is_freed():
    """Regression: the registry of patched modules once kept every patched model alive for good."""
    model = tiny_model()
    fastprefix.patch(model, random_prefix(model))
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


def test_patched_unpatches_when_the_block_raises():
    model = tiny_model()
    with pytest.raises(KeyError):
        with fastprefix.patched(model, random_prefix(model)):
            raise KeyError("inside")
    assert model.config._attn_implementation == "sdpa"
    fastprefix.patch(model, random_prefix(model)).unpatch()


def test_float_4d_mask_is_refused():
    model = tiny_model()
    ids = torch.randint(1, 100, (2, 6))
    mask = torch.zeros(2, 1, 6, 6)
    with fastprefix.patched(model, random_prefix(model)), pytest.raises(TypeError, match="2-D padding mask"):
        model(input_ids=ids, attention_mask=mask)


def greedy(model, ids, mask=None, new_tokens=12, **kwargs):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                          pad_token_id=0, **kwargs)


@pytest.mark.parametrize("per_row", [False, True], ids=["shared", "per_row"])
def test_left_padded_rows_generate_as_if_alone(per_row):
    """Positions come from the attention mask (P + 0, 1, ... for every row), the cache holds no prefix."""
    model = tiny_model()
    lengths = (7, 3, 5)
    ids, mask = padded_batch(lengths, 7, torch.Generator().manual_seed(2))
    prefix = random_prefix(model, batch=len(lengths) if per_row else None)
    with fastprefix.patched(model, prefix) as handle:
        out = greedy(model, ids, mask, return_dict_in_generate=True)
        for layer in cache_of(out).layers:
            assert layer.keys.shape[-2] == out.sequences.shape[1] - 1
        for r, n in enumerate(lengths):
            if per_row:
                handle.set_prefix(fastprefix.Prefix([k[r] for k in prefix.keys], [v[r] for v in prefix.values]))
            alone = greedy(model, ids[r:r + 1, 7 - n:])
            assert torch.equal(out.sequences[r, 7:], alone[0, n:]), f"row {r}"


def test_static_cache_forward_and_generate_match_dynamic_cache():
    """A static cache hands attention all its slots; on an empty one the mask is None (plain causal, upper-left
    aligned in HF's SDPA, which crops the keys to the queries). fastprefix crops the same way."""
    model = tiny_model()
    ids = torch.randint(1, 100, (2, 6), generator=torch.Generator().manual_seed(3))
    with fastprefix.patched(model, random_prefix(model)), torch.no_grad():
        static = StaticCache(config=model.config, max_cache_len=16)
        out = quiet(model, input_ids=ids, use_cache=True, **{cache_argument(model): static})
        assert static.layers[0].keys.shape[-2] == 16
        assert relative_error(out.logits, model(input_ids=ids).logits) < 1e-6
        assert torch.equal(greedy(model, ids, cache_implementation="static"), greedy(model, ids))


def test_gradient_checkpointing_gives_the_same_prefix_gradients():
    model = tiny_model().train()
    model.requires_grad_(False)
    prefix = random_prefix(model, requires_grad=True)
    ids, mask = padded_batch((8, 5), 8, torch.Generator().manual_seed(4))

    def prefix_grads():
        for t in prefix.keys + prefix.values:
            t.grad = None
        with fastprefix.patched(model, prefix):
            model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        return [t.grad for t in prefix.keys + prefix.values]

    expected = prefix_grads()
    quiet(model.gradient_checkpointing_enable)
    calls = checkpointed_layers(model)
    for got, want in zip(prefix_grads(), expected):
        assert relative_error(got, want) < 1e-6
    assert len(calls) == 2, "both layers must have run under checkpointing"
