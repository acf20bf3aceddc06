"""Tiny random models of every supported family, and a minimal tokenizer, for fast unit tests."""

from __future__ import annotations

import torch
import transformers

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gpt2")


def tiny_config(family: str, layers: int = 8):
    # A larger init spread than the default so that greedy outputs vary from token to token.
    # (Gemma scales its embeddings by sqrt(hidden): it needs a smaller spread.)
    common = dict(vocab_size=256, initializer_range=0.02 if family == "gemma3_text" else 0.2)
    if family == "gpt2":
        return transformers.GPT2Config(n_embd=64, n_layer=layers, n_head=4, n_positions=512, **common)
    llama_like = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        **common,
    )
    if family == "llama":
        return transformers.LlamaConfig(**llama_like)
    if family == "mistral":
        return transformers.MistralConfig(sliding_window=None, **llama_like)
    if family == "qwen2":
        return transformers.Qwen2Config(**llama_like)
    if family == "qwen3":
        return transformers.Qwen3Config(head_dim=16, **llama_like)
    if family == "gemma3_text":
        return transformers.Gemma3TextConfig(head_dim=16, sliding_window=16, query_pre_attn_scalar=16, **llama_like)
    raise ValueError(family)


def tiny_model(family: str, layers: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family, layers))
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


class TinyTokenizer:
    """Token ids <-> space-separated numbers; no chat template; no EOS."""

    pad_token_id = 0
    eos_token_id = None
    chat_template = None

    def __call__(self, text: str):
        return {"input_ids": [int(t) % 256 for t in text.split()]}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(f" {i}" for i in ids)


def hf_greedy(model, prompts: list[list[int]], n: int) -> list[list[int]]:
    """transformers' greedy tokens for ``prompts`` as one left-padded batch (pad id 0)."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False)
    return [row[width:].tolist() for row in out]
