"""The side network: exact at initialisation, layer-by-layer == all-at-once, saved and reloaded."""

import json

import pytest
import torch
from tinymodels import TINY_FAMILIES

from mobillm.errors import ConfigError
from mobillm.side.config import SideConfig
from mobillm.side.head import FrozenHead
from mobillm.side.io import SideFileError, SideMeta, load_side, read_meta, save_side
from mobillm.side.model import SideNetwork


def _hidden(bb, ids):
    hs = []
    bb.run(ids, torch.ones_like(ids), lambda tap, h: hs.append(h.reshape(-1, h.shape[-1]).clone()))
    return hs


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_untrained_causal_lm_equals_frozen_backbone(make_tiny_backbone, family):
    bb = make_tiny_backbone(family)
    cfg = SideConfig(hidden_size=bb.hidden_size, num_taps=len(bb.taps), task="causal_lm")
    net = SideNetwork(cfg, FrozenHead(*bb.export_head(cfg.head_rows)))
    ids = torch.randint(3, 300, (2, 6))
    with torch.no_grad():
        got = net.logits(net.features(_hidden(bb, ids)))
        ref = bb.model(input_ids=ids).logits.reshape(12, -1)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_verbalizer_head_equals_zero_shot(make_tiny_backbone):
    bb = make_tiny_backbone("llama")
    words = ("good", "bad", "movie")
    vids = bb.word_token_ids(words)
    cfg = SideConfig(
        hidden_size=32, num_taps=len(bb.taps), num_labels=3, verbalizer_ids=tuple(vids)
    )
    net = SideNetwork(cfg, FrozenHead(*bb.export_head(cfg.head_rows)))
    ids = torch.randint(3, 300, (4, 5))
    with torch.no_grad():
        logits = net.logits(net.features(_hidden(bb, ids)), pool_rows=torch.arange(4) * 5 + 4)
        ref = bb.model(input_ids=ids).logits[:, -1, vids]
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)


def test_stepwise_equals_batch_and_mean_pooling(make_tiny_backbone):
    bb = make_tiny_backbone("gpt2")
    cfg = SideConfig(hidden_size=32, num_taps=3, head_init="random", pooling="mean", num_labels=2)
    torch.manual_seed(0)
    net = SideNetwork(cfg, FrozenHead(*bb.export_head([]))).eval()
    torch.nn.init.normal_(net.up.weight)  # make the ladder matter
    hs = _hidden(bb, torch.randint(3, 300, (2, 3)))
    state = None
    with torch.no_grad():
        for tap, h in enumerate(hs):
            state = net.step(state, tap, h)
        torch.testing.assert_close(net.finish(state, hs[-1]), net.features(hs))
        row_sample = torch.tensor([0, 0, 0, 1, 1, 1])
        pooled = net.logits(net.features(hs), row_sample=row_sample, num_samples=2)
        manual = net.classifier(net.features(hs).reshape(2, 3, -1).mean(1))
    torch.testing.assert_close(pooled, manual)


def test_only_side_parameters_train(make_tiny_backbone):
    bb = make_tiny_backbone("opt")
    cfg = SideConfig(hidden_size=32, num_taps=3, task="causal_lm", reduction=4)
    net = SideNetwork(cfg, FrozenHead(*bb.export_head(None)))
    names = {n for n, _ in net.named_parameters()}
    assert not any(n.startswith("frozen") for n in names)
    assert set(net.trainable_state()) == {k for k in net.state_dict() if not k.startswith("frozen")}
    assert cfg.width == 8


@pytest.mark.parametrize(
    "bad",
    [
        {"reduction": 0},
        {"task": "seq2seq"},
        {"pooling": "max"},
        {"num_labels": 1},
        {"head_init": "verbalizer", "verbalizer_ids": (1,)},
        {"dropout": 1.5},
    ],
)
def test_bad_side_config(bad):
    base = {"hidden_size": 32, "num_taps": 2, "num_labels": 2, "head_init": "random"}
    with pytest.raises(ConfigError):
        SideConfig(**{**base, **bad})


def test_config_json_round_trip():
    cfg = SideConfig(hidden_size=64, num_taps=4, num_labels=3, verbalizer_ids=(5, 6, 7))
    assert SideConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ConfigError, match="unknown field"):
        SideConfig.from_dict({**cfg.to_dict(), "colour": "red"})


def test_save_load_round_trip_and_wrong_backbone(tmp_path, make_tiny_backbone):
    bb = make_tiny_backbone("llama")
    cfg = SideConfig(hidden_size=32, num_taps=3, head_init="random")
    head = FrozenHead(*bb.export_head([]))
    net = SideNetwork(cfg, head)
    torch.nn.init.normal_(net.up.weight)
    meta = SideMeta(cfg, bb.fingerprint, bb.taps, {"data": {"labels": ["0", "1"]}})
    save_side(net, meta, tmp_path / "s")
    files = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert files == ["side.json", "side.safetensors"]
    loaded, meta2 = load_side(tmp_path / "s", head, expect=bb.fingerprint)
    assert meta2.taps == bb.taps and meta2.task == meta.task
    for k, v in net.trainable_state().items():
        torch.testing.assert_close(loaded.trainable_state()[k], v)
    other = make_tiny_backbone("llama", seed=5).fingerprint
    with pytest.raises(SideFileError, match="another backbone"):
        load_side(tmp_path / "s", head, expect=other)


def test_malformed_side_files(tmp_path):
    with pytest.raises(SideFileError, match="not found"):
        read_meta(tmp_path / "missing")
    (tmp_path / "a").mkdir()
    with pytest.raises(SideFileError, match=r"no side\.json"):
        read_meta(tmp_path / "a")
    (tmp_path / "a" / "side.json").write_text("{not json")
    with pytest.raises(SideFileError, match="malformed"):
        read_meta(tmp_path / "a")
    (tmp_path / "a" / "side.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(SideFileError, match="format"):
        read_meta(tmp_path / "a")


def test_attention_mixer_keeps_samples_apart_and_starts_exact(make_tiny_backbone):
    bb = make_tiny_backbone("llama")
    cfg = SideConfig(
        hidden_size=32,
        num_taps=3,
        head_init="random",
        mixer="attention",
        mixer_heads=2,
        reduction=4,
        dropout=0.0,
    )
    torch.manual_seed(0)
    net = SideNetwork(cfg, FrozenHead(*bb.export_head([]))).eval()
    hs = _hidden(bb, torch.randint(3, 300, (2, 4)))  # 8 rows: sample 0 = rows 0-3, 1 = 4-7
    same = torch.tensor([4, 4])  # rows per sample
    with torch.no_grad():
        base = net.features(hs, same)
        torch.testing.assert_close(base, net.frozen.features(hs[-1]))  # up = 0: exact at init
        torch.nn.init.normal_(net.up.weight)
        before = net.features(hs, same)
        changed = [h.clone() for h in hs]
        for h in changed:
            h[5] += 10.0  # perturb one token of sample 1
        after = net.features(changed, same)
    torch.testing.assert_close(after[:4], before[:4])  # sample 0 cannot see sample 1
    assert not torch.allclose(after[4:], before[4:])  # sample 1's other tokens do
    with torch.no_grad(), pytest.raises(ValueError, match="rows_per_sample"):
        net.features(hs)


def test_attention_mixer_needs_classification():
    with pytest.raises(ConfigError, match="mixer"):
        SideConfig(hidden_size=32, num_taps=2, task="causal_lm", mixer="attention")
