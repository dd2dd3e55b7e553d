"""Tiny real components for tests: a BPE tokenizer built in memory and random small LMs."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = [
    "it 's a charming and often affecting journey .",
    "unflinchingly bleak and desperate",
    "Review: a good movie\nSentiment: positive",
    "Review: a bad movie\nSentiment: negative",
    "Tweet: self-driving cars just seem lazy",
    "the quick brown fox jumps over the lazy dog",
    "Question: what is two plus two?\nAnswer: four",
]


def build_tokenizer(bos: bool) -> PreTrainedTokenizerFast:
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(CORPUS * 3, trainer)
    if bos:
        # Llama-style: BOS prepended when add_special_tokens=True.
        tk.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tk.token_to_id("<s>"))]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
        )
    # SmolLM2-style: no BOS added and no pad token (padding falls back to EOS).
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>")


TINY_FAMILIES = ("llama", "qwen2", "gemma", "gpt2", "opt", "olmo")


def tiny_model(family: str, vocab: int = 400, layers: int = 3, seed: int = 0):
    """A tiny random causal LM of ``family`` (hidden 32), with perturbed norms so heads differ."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        GemmaConfig,
        GPT2Config,
        LlamaConfig,
        OlmoConfig,
        OPTConfig,
        Qwen2Config,
    )

    # A wide init gives the tied LM head logits large enough to fit (0.02 caps them near 1).
    common = {
        "vocab_size": vocab,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "initializer_range": 0.3,
        "init_std": 0.3,
    }
    cfg = {
        "llama": lambda: LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            **common,
        ),
        "qwen2": lambda: Qwen2Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            **common,
        ),
        "gemma": lambda: GemmaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=8,
            **common,
        ),
        "olmo": lambda: OlmoConfig(  # norms without weights
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            **common,
        ),
        "gpt2": lambda: GPT2Config(n_embd=32, n_layer=layers, n_head=4, **common),
        "opt": lambda: OPTConfig(
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=layers,
            num_attention_heads=4,
            word_embed_proj_dim=16,
            **common,
        ),
    }[family]()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval().requires_grad_(False)
