"""Every supported family: layer taps arrive in order, and the exported head is exact."""

import pytest
import torch
from tinymodels import TINY_FAMILIES

from mobillm.backbone import resolve_taps
from mobillm.side.head import FrozenHead


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_taps_and_head_reproduce_logits(make_tiny_backbone, family):
    bb = make_tiny_backbone(family)
    ids = torch.randint(3, 300, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    seen: list[tuple[int, tuple[int, ...]]] = []
    last: list[torch.Tensor] = []

    def on_layer(tap, h):
        seen.append((tap, tuple(h.shape)))
        last[:] = [h.clone()]

    assert bb.run(ids, mask, on_layer) is None
    assert [t for t, _ in seen] == list(range(bb.num_layers))
    assert all(shape == (2, 7, bb.hidden_size) for _, shape in seen)
    head = FrozenHead(*bb.export_head())
    with torch.no_grad():
        ref = bb.model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(head(last[0]), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_no_logits_and_nothing_retained(make_tiny_backbone, family):
    """The LM head never runs while training, and no layer output outlives its callback."""
    bb = make_tiny_backbone(family)
    calls = []
    handle = bb.model.get_output_embeddings().register_forward_hook(lambda *a: calls.append(1))
    refs = []
    bb.run(
        torch.randint(3, 300, (1, 5)),
        torch.ones(1, 5, dtype=torch.long),
        lambda tap, h: refs.append(h.data_ptr()),
    )
    handle.remove()
    assert calls == []
    assert len(refs) == bb.num_layers


def test_every_k_and_list_taps(make_tiny_backbone):
    assert resolve_taps("all", 4) == (0, 1, 2, 3)
    assert resolve_taps("every:2", 5) == (1, 3, 4)
    assert resolve_taps("0,2", 6) == (0, 2, 5)
    bb = make_tiny_backbone("llama", taps="every:2", layers=4)
    assert bb.taps == (1, 3)
    got = []
    bb.run(
        torch.randint(3, 300, (1, 4)),
        torch.ones(1, 4, dtype=torch.long),
        lambda tap, h: got.append(tap),
    )
    assert got == [0, 1]


@pytest.mark.parametrize("bad", ["", "every:0", "every:x", "1,a", "9"])
def test_bad_taps_are_config_errors(bad):
    from mobillm.errors import ConfigError

    with pytest.raises(ConfigError):
        resolve_taps(bad, 4)


def test_fingerprint_tracks_config_and_head(make_tiny_backbone):
    a = make_tiny_backbone("llama", seed=0).fingerprint
    b = make_tiny_backbone("llama", seed=0).fingerprint
    c = make_tiny_backbone("llama", seed=1).fingerprint
    d = make_tiny_backbone("llama", seed=0, layers=2).fingerprint
    assert a == b
    assert a.head_sha256 != c.head_sha256 and a.config_sha256 == c.config_sha256
    assert a.config_sha256 != d.config_sha256
    assert "head_sha256" in a.mismatch(c)


def test_head_rows_slice(make_tiny_backbone):
    bb = make_tiny_backbone("gpt2")
    spec, tensors = bb.export_head([5, 9])
    assert spec.vocab_rows == 2 and tensors["lm_head.weight"].shape == (2, 32)
    spec0, tensors0 = bb.export_head([])
    assert spec0.vocab_rows == 0 and "lm_head.weight" not in tensors0
