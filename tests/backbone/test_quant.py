"""An int8 device backbone: close to fp32, a fingerprint of its own, the server's layers intact."""

import torch
from torch import nn

from mobillm.backbone import BackboneConfig


def test_int8_backbone(make_tiny_backbone):
    plain = make_tiny_backbone("llama", layers=3)
    quant = make_tiny_backbone("llama", layers=3)
    quant.cfg = BackboneConfig(source="tiny-llama", quant="int8")
    ids = torch.randint(3, 300, (2, 12))
    mask = torch.ones_like(ids)
    outs = {}
    for name, bb in (("fp32", plain), ("int8", quant)):
        got: list[torch.Tensor] = []
        bb.run(ids, mask, lambda i, h, got=got: got.append(h.clone()))
        outs[name] = got
    for a, b in zip(outs["fp32"], outs["int8"], strict=True):
        rel = ((a - b).norm() / a.norm()).item()
        assert 0 < rel < 0.25, rel  # quantized, and close (a tiny random model is hard on int8)
    assert quant.fingerprint.config_sha256 != plain.fingerprint.config_sha256
    assert not any(type(m) is nn.Linear for m in quant.layers.modules())


def test_int8_split_keeps_the_servers_layers(make_tiny_backbone):
    bb = make_tiny_backbone("llama", layers=3)
    bb.cfg = BackboneConfig(source="tiny-llama", quant="int8")
    bb.set_split(1)
    bb.run(torch.randint(3, 300, (1, 8)), torch.ones(1, 8, dtype=torch.long), lambda i, h: None)
    assert not any(type(m) is nn.Linear for m in bb.layers[:2].modules())
    assert any(type(m) is nn.Linear for m in bb.layers[2].modules())  # uploaded as they are
