"""Helpers for tests and benchmarks: a tiny randomly initialised Llama that loads through the real code.

It borrows a real model's tokenizer files (so prompts, chat templates and decoding behave as in
production) and has random weights (so it is fast and its text is noise). ``context`` is small on
purpose, so over-long prompts are easy to make.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def build_tiny_llama(dest: Path, tokenizer_from: Path, *, context: int = 1024, layers: int = 2,
                     hidden: int = 64, seed: int = 0) -> Path:
    """Save a tiny random Llama with ``tokenizer_from``'s tokenizer into ``dest`` (once) and return it."""
    return build_random_llama(dest, tokenizer_from, seed=seed, hidden_size=hidden, intermediate_size=hidden * 2,
                              num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                              max_position_embeddings=context, tie_word_embeddings=True)


def build_random_llama(dest: Path, tokenizer_from: Path, *, seed: int = 0, **config: Any) -> Path:
    """Save a randomly initialised Llama of the given config (``LlamaConfig`` fields) with
    ``tokenizer_from``'s tokenizer (and its vocabulary, BOS and EOS) into ``dest`` (once) and return it."""
    if (dest / "config.json").is_file():
        return dest
    import json

    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    base = json.loads((tokenizer_from / "config.json").read_text())
    llama = LlamaConfig(**{"vocab_size": base["vocab_size"], "bos_token_id": base.get("bos_token_id"),
                           "eos_token_id": base.get("eos_token_id"), "architectures": ["LlamaForCausalLM"],
                           **config})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama)
    model.generation_config = GenerationConfig(eos_token_id=llama.eos_token_id, bos_token_id=llama.bos_token_id)
    partial = dest.with_name(dest.name + ".partial")
    model.save_pretrained(partial)
    for name in TOKENIZER_FILES:
        if (tokenizer_from / name).is_file():
            shutil.copy(tokenizer_from / name, partial / name)
    if dest.exists():
        shutil.rmtree(dest)
    partial.rename(dest)
    return dest
