"""Streamed weights: the same hidden states bit for bit, and only about a layer resident."""

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mobillm.backbone import Backbone, BackboneConfig


def _mapped_rss_mb(path: Path) -> float:
    """Resident MB of the mappings of ``path`` in this process (from /proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if "-" in line.split()[0] and not line.split()[0].endswith(":"):
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total / 1024


def _write_model(folder: Path, tokenizer) -> Path:
    """A 6-layer Llama big enough that its weights dominate RSS; returns its safetensors file."""
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=512, intermediate_size=1024,
        num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder / "model.safetensors"


def test_streamed_forward_is_identical_and_holds_a_layer(tmp_path, bos_tokenizer):
    weights = _write_model(tmp_path, bos_tokenizer)
    ids = torch.randint(3, len(bos_tokenizer), (4, 16))
    mask = torch.ones_like(ids)
    outs = {}
    for mode in ("off", "warm", "cold"):
        cfg = BackboneConfig(source=str(tmp_path), stream=mode != "off", cold=mode == "cold")
        bb = Backbone.load(cfg)
        got: list[torch.Tensor] = []
        for _ in range(2):  # the second pass reads the pages the first one handed back
            got.clear()
            bb.run(ids, mask, lambda i, h, got=got: got.append(h.clone()))
        outs[mode] = (got, _mapped_rss_mb(weights))
        del bb
    (plain, plain_rss), (streamed, streamed_rss) = outs["off"], outs["warm"]
    assert all(torch.equal(a, b) for a, b in zip(plain, streamed, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(plain, outs["cold"][0], strict=True))
    total = weights.stat().st_size / 2**20
    assert plain_rss > total / 2, (plain_rss, total)  # the check can see resident weights
    assert streamed_rss < total / 4, (streamed_rss, total)


def test_a_split_side_network_streams_the_top_layers_too(tmp_path, bos_tokenizer):
    """On the device, a split side network runs the backbone's own top layers: with streamed
    weights they are handed back after running as well, with the same logits."""
    from mobillm.data import Batch
    from mobillm.device.local import LocalModel
    from mobillm.device.runtime import build_side_config

    weights = _write_model(tmp_path, bos_tokenizer)
    ids = torch.randint(3, len(bos_tokenizer), (4, 16))
    batch = Batch(ids, torch.ones_like(ids), labels=torch.zeros(4, dtype=torch.long),
                  loss_positions=torch.full((4,), 15))  # fmt: skip
    logits, rss = {}, {}
    for stream in (False, True):
        bb = Backbone.load(BackboneConfig(source=str(tmp_path), stream=stream))
        side = build_side_config(bb, "classification", 2, ("good", "bad"), kind="split",
                                 split_layers=3)  # fmt: skip
        model = LocalModel.untrained(bb, side)
        logits[stream] = model.class_logits(batch)
        rss[stream] = _mapped_rss_mb(weights)
        del bb, model
    total = weights.stat().st_size / 2**20
    assert torch.equal(logits[False], logits[True])
    assert rss[False] > total / 2, (rss[False], total)
    assert rss[True] < total / 4, (rss[True], total)
