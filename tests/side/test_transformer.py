"""Side transformer: pruned narrow decoder layers over every token; the frozen backbone at
initialisation, then learns, downloads and runs on the device."""

import json

import pytest
import torch

from mobillm.data import collate
from mobillm.device.local import LocalModel
from mobillm.device.rows import plan_rows
from mobillm.device.runtime import DeviceConfig, DeviceTrainer, build_session, build_side_config
from mobillm.errors import ConfigError
from mobillm.server.budget import price
from mobillm.server.inprocess import InProcessTransport
from mobillm.server.sessions import ServerConfig, SessionManager
from mobillm.side.head import FrozenHead
from mobillm.side.learner import build_learner
from mobillm.side.transformer import KEEP, default_taps, prune_layers
from mobillm.transport.messages import TrainConfig

from .test_split import _data, _full_logits


def test_default_taps_skip_the_shallow_third():
    assert default_taps(30) == tuple(range(11, 30, 2))
    assert default_taps(24) == tuple(range(9, 24, 2))
    assert default_taps(1) == (0,)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_untrained_side_transformer_equals_the_backbone(make_tiny_backbone, family):
    bb = make_tiny_backbone(family, layers=4)
    data, cfg = _data(bb.tokenizer, n=8)
    side = build_side_config(bb, "classification", 2, cfg.verbalizers, kind="transformer")
    assert side.positions == "valid" and bb.taps == default_taps(4)
    spec, tensors = build_session(bb, side, spec_codec(), TrainConfig(), positions="valid")
    layers = {k: v for k, v in tensors.items() if k.startswith("layers.")}
    head = FrozenHead(*bb.export_head(side.head_rows))
    server = build_learner(side, head, layers)  # as the server builds it, from the upload
    batch = collate(data, list(range(8)))
    want = _full_logits(bb, batch, list(side.verbalizer_ids))
    plan = plan_rows(batch, "valid")
    state = None
    with torch.no_grad():

        def on_layer(tap, h):
            nonlocal state, last
            last = plan.gather(h)
            state = server.step(state, tap, last, plan.rows_per_sample)

        last = None
        bb.run(batch.input_ids, batch.attention_mask, on_layer)
        got = server.logits(server.finish(state, last), plan.pool_rows)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # and on the device, with fresh blocks (``up`` is zero, so they do not matter yet)
    torch.testing.assert_close(
        LocalModel.untrained(bb, side).class_logits(batch), want, atol=1e-5, rtol=1e-5
    )
    # the pruned blocks are trainable copies, not the uploaded tensors
    block = dict(server.blocks.named_parameters())
    name = "0.mlp.down_proj.weight"
    assert block[name].requires_grad
    assert block[name].data_ptr() != layers[f"layers.{name}"].data_ptr()
    assert spec.side.kind == "transformer"


def spec_codec():
    from mobillm.codec import CodecConfig

    return CodecConfig("int8")


def test_a_causal_lm_side_transformer_session_is_valid(make_tiny_backbone):
    """Its upload is the whole LM head plus the pruned blocks: hashed together, so the head
    hash is not the backbone's, as for a split session."""
    bb = make_tiny_backbone("llama", layers=4)
    side = build_side_config(bb, "causal_lm", 0, (), kind="transformer")
    spec, tensors = build_session(bb, side, spec_codec(), TrainConfig(), positions="valid")
    assert spec.head.vocab_rows == bb.fingerprint.vocab_size
    assert any(k.startswith("layers.") for k in tensors)


def test_pruning_keeps_the_largest_units(make_tiny_backbone):
    bb = make_tiny_backbone("llama", layers=2)
    config = bb.model.config
    w = {k: v.clone() for k, v in bb.layers[1].state_dict().items()}
    d = config.hidden_size
    # make residual dimension 5 and MLP neuron 7 dominate everything else
    w["mlp.down_proj.weight"][5, :] *= 100
    w["mlp.gate_proj.weight"][7, :] *= 100
    out = prune_layers(config, [w], reduction=4)
    keep = out[KEEP]
    assert keep.numel() == d // 4 and 5 in keep.tolist() and keep.tolist() == sorted(keep.tolist())
    row = keep.tolist().index(5)
    torch.testing.assert_close(out["layers.0.mlp.down_proj.weight"][row].abs().max(),
                               w["mlp.down_proj.weight"][5].abs().max())  # fmt: skip
    # neuron 7's gate row, restricted to the kept residual dimensions, was kept
    gate = out["layers.0.mlp.gate_proj.weight"]
    assert any(torch.equal(r, w["mlp.gate_proj.weight"][7, keep]) for r in gate)


def test_side_transformer_trains_downloads_and_runs_on_the_device(tmp_path, make_tiny_backbone):
    bb = make_tiny_backbone("llama", layers=4)
    data, _ = _data(bb.tokenizer, n=96)
    # hidden 32: at the default reduction the side width would be 4
    side = build_side_config(
        bb, "classification", 2, ("good", "bad"), kind="transformer", reduction=4
    )
    before = LocalModel.untrained(bb, side).evaluate(data)["accuracy"]
    mgr = SessionManager(ServerConfig(workdir=str(tmp_path / "server")))
    tr = DeviceTrainer(
        bb,
        side,
        InProcessTransport(mgr),
        train=TrainConfig(lr=1e-2),
        device=DeviceConfig(epochs=4),  # the default protocol: private labels
    )
    summary = tr.train(data, 16)
    assert summary["device_forward_passes_per_sample"] == 1.0
    out = tr.download(tmp_path / "side", {})
    tr.transport.close()
    after = LocalModel.load(bb, out).evaluate(data)["accuracy"]
    assert after >= 0.9 and after > before


def test_side_transformer_is_refused_where_it_cannot_work(make_tiny_backbone):
    with pytest.raises(ConfigError, match="side transformer supports"):
        build_side_config(make_tiny_backbone("gpt2"), "classification", 2, ("bad", "good"),
                          kind="transformer")  # fmt: skip


def test_server_prices_a_side_transformer_from_its_config(make_tiny_backbone):
    bb = make_tiny_backbone("llama", layers=4)
    side = build_side_config(bb, "classification", 2, ("bad", "good"), kind="transformer")
    spec, _ = build_session(bb, side, spec_codec(), TrainConfig(), positions="valid")
    small = price(spec).side_bytes
    wide = json.loads(side.layers_config) | {"intermediate_size": 1 << 16}
    spec_wide = spec.replace(side=side.replace(layers_config=json.dumps(wide)))
    assert price(spec_wide).side_bytes > 50 * small  # a client cannot hide a huge block


def test_untrained_causal_side_transformer_generates_as_the_backbone(make_tiny_backbone):
    """Causal-LM tuning: a side transformer keeps no KV cache and re-reads the sequence per
    token; untrained, it continues a prompt exactly as the frozen backbone (the ladder) does."""
    bb = make_tiny_backbone("qwen2", layers=4)
    ladder = build_side_config(bb, "causal_lm", 0, ())
    want = LocalModel.untrained(bb, ladder).generate("a movie good", max_new_tokens=6)
    assert want  # the tiny model says something (no end-of-sequence first)
    side = build_side_config(bb, "causal_lm", 0, (), kind="transformer")
    assert bb.taps == default_taps(4)
    assert LocalModel.untrained(bb, side).generate("a movie good", max_new_tokens=6) == want
