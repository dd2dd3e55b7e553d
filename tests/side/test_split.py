"""Split learner: the server's top K layers with LoRA reproduce the backbone, then learn."""

import pytest
import torch

from mobillm.data import ClassificationExample, DataConfig, collate, tokenize_examples
from mobillm.device.local import LocalModel
from mobillm.device.rows import plan_rows
from mobillm.device.runtime import DeviceConfig, DeviceTrainer, build_side_config
from mobillm.errors import ConfigError
from mobillm.server.inprocess import InProcessTransport
from mobillm.server.sessions import ServerConfig, SessionManager
from mobillm.side.head import FrozenHead
from mobillm.side.learner import build_learner
from mobillm.transport.messages import TrainConfig


def _data(tok, n=64, seed=0):
    import random

    rnd = random.Random(seed)
    ex = []
    for _ in range(n):
        word = rnd.choice(["good", "bad"])
        ex.append(
            ClassificationExample(f"{rnd.choice(['a movie', 'the fox'])} {word}", word == "good")
        )
    cfg = DataConfig(labels=("0", "1"), verbalizers=("bad", "good"), batch_size=16)
    return tokenize_examples(ex, tok, cfg), cfg


def _full_logits(bb, batch, rows):
    """The backbone alone: last layer -> final norm -> LM-head rows, at each sample's last token."""
    with torch.inference_mode():
        out = bb.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    last = batch.attention_mask.sum(1) - 1
    return out.logits[torch.arange(len(last)), last][:, rows]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("k", [1, 3])
def test_untrained_split_learner_equals_the_backbone(make_tiny_backbone, family, k):
    bb = make_tiny_backbone(family, layers=4)
    data, cfg = _data(bb.tokenizer, n=8)
    side = build_side_config(bb, "classification", 2, cfg.verbalizers, kind="split", split_layers=k)
    assert bb.taps == (4 - 1 - k,)
    model = LocalModel.untrained(bb, side)
    # on the server: rebuilt from the uploaded tensors, not the device's modules
    head = FrozenHead(*bb.export_head(side.head_rows))
    server = build_learner(side, head, {k_: v.clone() for k_, v in bb.top_layers(k)[1].items()})
    batch = collate(data, list(range(8)))
    want = _full_logits(bb, batch, list(side.verbalizer_ids))
    torch.testing.assert_close(model.class_logits(batch), want, atol=1e-5, rtol=1e-5)
    plan = plan_rows(batch, "valid")
    rows = []
    bb.run(batch.input_ids, batch.attention_mask, lambda tap, h: rows.append(plan.gather(h)))
    assert len(rows) == 1  # the device stopped at the boundary
    with torch.no_grad():
        feats = server.finish(server.step(None, 0, rows[0], plan.rows_per_sample))
        got = server.logits(feats, plan.pool_rows)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert set(server.trainable_state()) == {
        n for n, p in server.named_parameters() if p.requires_grad
    } and all("lora_" in n or n.startswith("classifier") for n in server.trainable_state())


def test_split_trains_downloads_and_runs_on_the_device(tmp_path, make_tiny_backbone):
    bb = make_tiny_backbone("llama", layers=4)
    data, _ = _data(bb.tokenizer, n=96)
    # verbalizers swapped: the frozen model, which tends to echo the last word, starts wrong
    side = build_side_config(bb, "classification", 2, ("good", "bad"), kind="split", split_layers=2)
    before = LocalModel.untrained(bb, side).evaluate(data)["accuracy"]
    mgr = SessionManager(ServerConfig(workdir=str(tmp_path / "server")))
    tr = DeviceTrainer(
        bb,
        side,
        InProcessTransport(mgr),
        train=TrainConfig(lr=1e-2),
        device=DeviceConfig(positions="valid", epochs=4, private_labels=False),
    )
    summary = tr.train(data, 16)
    assert summary["device_forward_passes_per_sample"] == 1.0
    out = tr.download(tmp_path / "side", {})
    closed = tr.transport.close()
    assert closed["optimizer_steps"] == 24
    weights = (out / "side.safetensors").stat().st_size
    assert weights < 200_000  # LoRA + classifier, not the layers
    after = LocalModel.load(bb, out).evaluate(data)["accuracy"]
    assert after >= 0.9 and after > before


def test_split_is_refused_where_it_cannot_work(make_tiny_backbone):
    with pytest.raises(ConfigError, match="split mode supports"):
        build_side_config(make_tiny_backbone("gpt2"), "classification", 2, ("bad", "good"),
                          kind="split", split_layers=1)  # fmt: skip
    bb = make_tiny_backbone("llama", layers=3)
    with pytest.raises(ConfigError, match="split layers must be in"):
        build_side_config(bb, "classification", 2, ("bad", "good"), kind="split", split_layers=3)
