"""Tiny local models and tokenizers for tests and the demo: nothing is downloaded from a hub."""

from __future__ import annotations

import os
from typing import Iterable

# A chat template with a generation prompt, in the shape Axolotl's `chat_template` strategies expect.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|> ' + message['content'] + ' <|end|> ' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|unk|>", "<s>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]


def build_tokenizer(corpus: Iterable[str], save_dir: str | None = None):
    """Train a whitespace word-level tokenizer on `corpus` and wrap it for transformers.

    `<|end|>` closes every turn and is the EOS token, so generation stops at the end of an answer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|end|>",
        unk_token="<|unk|>",
        pad_token="<|pad|>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    if save_dir:
        tokenizer.save_pretrained(save_dir)
    return tokenizer


def build_tiny_llama(tokenizer, save_dir: str | None = None, seed: int = 0, **overrides):
    """A randomly initialised Llama sized for CPU tests (2 layers, hidden 32 unless overridden)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=overrides.pop("hidden_size", 32),
        intermediate_size=overrides.pop("intermediate_size", 64),
        num_hidden_layers=overrides.pop("num_hidden_layers", 2),
        num_attention_heads=overrides.pop("num_attention_heads", 2),
        num_key_value_heads=overrides.pop("num_key_value_heads", 2),
        max_position_embeddings=overrides.pop("max_position_embeddings", 256),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **overrides,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if save_dir:
        os.makedirs(save_dir, exist_ok=True)
        model.save_pretrained(save_dir)
        tokenizer.save_pretrained(save_dir)
    return model
