"""A tiny random Llama and a learnable task, written as a user's own model and data would be.

The fault harness runs many real device processes at once; with a real backbone that would
take a machine per device. This model is a real ``transformers`` Llama (two layers, width 64,
random weights) with a real BPE tokenizer, saved with ``save_pretrained`` so ``mobillm train
--model DIR`` loads it like any local model. The task's label is the review's last word.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

WORDS = ("good", "bad")
HEADS = ("the film was", "a movie that is", "this show felt", "my evening was", "the plot is")
TASK_FLAGS = (
    "--text-column", "text", "--label-column", "label", "--labels", "bad,good",
    "--verbalizers", "bad,good", "--template", "Review: {text}\\nSentiment:",
)  # fmt: skip


def write_tiny_model(folder: str | Path, seed: int = 0) -> Path:
    """Save a tiny random Llama and its tokenizer to ``folder`` (once; reused if present)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(folder)
    if (out / "config.json").is_file():
        return out
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [f"Review: {h} {w}\nSentiment: {w}" for h in HEADS for w in WORDS]
    tk.train_from_iterator(corpus * 4, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        initializer_range=0.3,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_task(path: str | Path, n: int, seed: int = 0) -> Path:
    """A TSV of ``n`` reviews whose label is their last word."""
    rnd = random.Random(seed)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["text", "label"])
        for _ in range(n):
            word = rnd.choice(WORDS)
            w.writerow([f"{rnd.choice(HEADS)} {word}", word])
    return p
