"""An int8 device backbone: close to fp32, a fingerprint of its own, the server's layers intact."""

import functools
import json
import os
import shutil

import torch
from torch import nn

from mobillm.backbone import BackboneConfig
from mobillm.backbone.quant import Int8Linear


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
    # smoothed family: every linear int8 but the MLP's down projection (kept in float)
    floats = {n for n, m in quant.layers.named_modules() if type(m) is nn.Linear}
    assert floats == {f"{i}.mlp.down_proj" for i in range(3)}
    assert sum(type(m) is Int8Linear for m in quant.layers.modules()) == 3 * 6


def test_int8_split_keeps_the_servers_layers(make_tiny_backbone):
    bb = make_tiny_backbone("llama", layers=3)
    bb.cfg = BackboneConfig(source="tiny-llama", quant="int8")
    bb.set_split(1)
    bb.run(torch.randint(3, 300, (1, 8)), torch.ones(1, 8, dtype=torch.long), lambda i, h: None)
    floats = {n for n, m in bb.layers.named_modules() if type(m) is nn.Linear}
    assert {n for n in floats if not n.startswith("2.")} == {"0.mlp.down_proj", "1.mlp.down_proj"}
    assert sum(n.startswith("2.") for n in floats) == 7  # uploaded as they are


def test_smoothing_keeps_the_float_function(make_tiny_backbone):
    """Smoothing alone (no quantization) folds factors into norms and projections: the same
    hidden states in float; and the factors are not all one (something was moved)."""
    from mobillm.backbone.quant import CALIBRATION_TEXT, calibrate, layer_amax, smooth_layer

    bb = make_tiny_backbone("qwen2", layers=3)  # grouped-query attention, value biases
    ids = torch.randint(3, 300, (2, 12))
    mask = torch.ones_like(ids)

    def states():
        got: list[torch.Tensor] = []
        bb.run(ids, mask, lambda i, h: got.append(h.clone()))
        return got

    before = states()
    norm = bb.layers[0].input_layernorm.weight.clone()
    calib = bb.tokenizer(CALIBRATION_TEXT, return_tensors="pt")["input_ids"]
    base = bb.family.base(bb.model)
    amax = calibrate(
        list(bb.layers),
        lambda: base(input_ids=calib, attention_mask=torch.ones_like(calib), use_cache=False),
    )
    for i, layer in enumerate(bb.layers):
        smooth_layer(layer, layer_amax(amax, i), bb.model.config)
    assert not torch.allclose(bb.layers[0].input_layernorm.weight, norm)
    for a, b in zip(before, states(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_int8_linear_scales_each_token_alone():
    """One loud token must not coarsen the others (one scale per tensor would), and the
    result stays close to the float layer's."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    q = Int8Linear(lin)
    quiet = torch.randn(3, 64)
    loud = torch.cat([quiet, 1000 * torch.randn(1, 64)])
    torch.testing.assert_close(q(loud)[:3], q(quiet), rtol=0, atol=0)
    want = lin(quiet).detach()
    rel = ((q(quiet) - want).norm() / want.norm()).item()
    assert 0 < rel < 0.02, rel
    assert q(torch.randn(2, 5, 64)).shape == (2, 5, 48)


def _states(bb, ids, mask):
    got: list[torch.Tensor] = []
    bb.run(ids, mask, lambda i, h: got.append(h.clone()))
    return got


def test_int8_layers_are_cached_and_mapped_back(model_dir, monkeypatch, tmp_path):
    """A model loaded from a folder: its quantized layers are written to the cache and mapped
    back from there (file pages, which streaming can hand back); a second load maps them
    without calibrating again and computes exactly the same states."""
    from mobillm.backbone import Backbone, pages, quant

    monkeypatch.setenv("MOBILLM_CACHE", str(tmp_path / "cache"))
    ids = torch.randint(3, 300, (2, 12))
    mask = torch.ones_like(ids)
    states = functools.partial(_states, ids=ids, mask=mask)

    first = Backbone.load(BackboneConfig(source=model_dir, quant="int8"))
    want = states(first)
    files = sorted((tmp_path / "cache" / "int8").glob("*/layer-*.safetensors"))
    assert [f.name for f in files] == [f"layer-{i}.safetensors" for i in range(first.num_layers)]
    maps = pages._mappings()

    def mapped_from(t):
        m = next(m for m in maps if m.start <= t.data_ptr() < m.end)
        return m.path

    q = first.layers[0].self_attn.q_proj
    assert isinstance(q, Int8Linear) and mapped_from(q.qweight) == str(files[0])

    def no_calibration(*a, **k):
        raise AssertionError("calibrated again")

    monkeypatch.setattr(quant, "calibrate", no_calibration)
    again = Backbone.load(BackboneConfig(source=model_dir, quant="int8"))
    for a, b in zip(want, states(again), strict=True):
        assert torch.equal(a, b)
    assert again.fingerprint == first.fingerprint


def test_int8_layers_quantized_later_match_a_fresh_run(model_dir, monkeypatch, tmp_path):
    """A split run caches the lower layers only; a later run with every layer maps those and
    quantizes the rest with the kept calibration: the same states as one fresh quantization
    of every layer (in another cache)."""
    from mobillm.backbone import Backbone

    ids = torch.randint(3, 300, (2, 12))
    mask = torch.ones_like(ids)
    states = functools.partial(_states, ids=ids, mask=mask)

    monkeypatch.setenv("MOBILLM_CACHE", str(tmp_path / "a"))
    split = Backbone.load(BackboneConfig(source=model_dir, quant="int8"))
    split.set_split(1)
    split.run(ids, mask, lambda i, h: None)
    cached = sorted(p.name for p in (tmp_path / "a" / "int8").glob("*/*.safetensors"))
    n = split.num_layers
    assert cached == ["calibration.safetensors"] + [f"layer-{i}.safetensors" for i in range(n - 1)]
    later = states(Backbone.load(BackboneConfig(source=model_dir, quant="int8")))
    monkeypatch.setenv("MOBILLM_CACHE", str(tmp_path / "b"))
    fresh = states(Backbone.load(BackboneConfig(source=model_dir, quant="int8")))
    for a, b in zip(later, fresh, strict=True):
        assert torch.equal(a, b)


def test_a_changed_model_replaces_its_int8_cache(model_dir, monkeypatch, tmp_path):
    """New weights in the model's folder give a new cache folder, which replaces the old one;
    a folder made by another recipe for the same model stays."""
    from mobillm.backbone import Backbone

    model_dir = shutil.copytree(model_dir, tmp_path / "model")  # its weights will change
    monkeypatch.setenv("MOBILLM_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "cache" / "int8"
    other = root / "another-recipe"  # another install's folder for the same model
    other.mkdir(parents=True)
    ids = torch.randint(3, 300, (1, 6))

    def load_and_run():  # layers are quantized (and cached) as they first run
        _states(Backbone.load(BackboneConfig(source=model_dir, quant="int8")), ids, ids > 0)

    load_and_run()
    (first,) = [p for p in root.iterdir() if p != other]
    made_for = json.loads((first / "source.json").read_text())
    assert made_for["source"] == str(model_dir.resolve())
    (other / "source.json").write_text(json.dumps({**made_for, "recipe": "another"}))
    weights = next(model_dir.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    load_and_run()
    (second,) = [p for p in root.iterdir() if p != other]
    assert second != first and not first.exists() and other.exists()
    assert sorted(p.name for p in second.glob("layer-*.safetensors"))


def test_int8_layers_are_cached_under_the_weights_as_loaded(model_dir, monkeypatch, tmp_path):
    """Weights replaced after a process loaded the model: that process's layers (quantized
    from the old weights) must not be cached where a load of the new weights would look."""
    from mobillm.backbone import Backbone

    model_dir = shutil.copytree(model_dir, tmp_path / "model")
    monkeypatch.setenv("MOBILLM_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "cache" / "int8"
    ids = torch.randint(3, 300, (1, 6))
    old = Backbone.load(BackboneConfig(source=model_dir, quant="int8"))
    weights = next(model_dir.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    _states(old, ids, ids > 0)  # quantized now, after the change
    (first,) = root.iterdir()
    _states(Backbone.load(BackboneConfig(source=model_dir, quant="int8")), ids, ids > 0)
    (second,) = root.iterdir()
    assert second != first


def test_a_model_not_from_a_folder_is_not_cached(make_tiny_backbone, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "stray.safetensors").write_bytes(b"")  # a cwd with weights must not key it
    (tmp_path / "config.json").write_text("{}")
    bb = make_tiny_backbone("llama")
    assert bb._int8_cache() is None
