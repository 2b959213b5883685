"""What tests/test_readme.py's fast tier gives README blocks in place of SmolLM2: a tiny random LLaMA and a
byte-level tokenizer, both built here (no download), shaped like `fastprefix.presets.smollm2()`'s pair."""

from fastprefix.presets import tiny_llama

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_tokenizer():
    """A tokenizer with one token per byte (ids 3 to 258), <pad> (0), <|im_start|> (1) and <|im_end|> (2, the
    end of a turn, as in SmolLM2), a chat template of SmolLM2's form, left padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(specials + alphabet)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", additional_special_tokens=specials[1:],
                                   padding_side="left", chat_template=CHAT_TEMPLATE)


def stand_in_smollm2():
    """(model, tokenizer) as `fastprefix.presets.smollm2()` returns them, tiny: the same random LLaMA on every
    call (as SmolLM2's weights are the same on every call)."""
    return tiny_llama(), byte_tokenizer()
