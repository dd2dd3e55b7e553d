"""Integration on the real SmolLM2-135M weights: exactness, classification and causal-LM tuning."""

import json
import random

import pytest
import torch

from mobillm.codec import CodecConfig
from mobillm.data import DataConfig, LMExample, load_examples, resolve_preset, tokenize_examples
from mobillm.device.local import LocalModel
from mobillm.device.runtime import DeviceConfig, DeviceTrainer, build_side_config
from mobillm.server.inprocess import InProcessTransport
from mobillm.server.sessions import ServerConfig, SessionManager
from mobillm.side.config import SideConfig
from mobillm.side.head import FrozenHead
from mobillm.side.model import SideNetwork
from mobillm.transport.messages import TrainConfig

pytestmark = pytest.mark.slow


def test_untrained_side_network_is_the_frozen_model(smollm2):
    ids = torch.tensor([smollm2.tokenizer("The capital of France is")["input_ids"]])
    hs = []
    smollm2.run(ids, torch.ones_like(ids), lambda t, h: hs.append(h[0].clone()))
    cfg = SideConfig(hidden_size=576, num_taps=30, task="causal_lm")
    net = SideNetwork(cfg, FrozenHead(*smollm2.export_head(None)))
    with torch.no_grad():
        got = net.logits(net.features(hs))
        ref = smollm2.model(input_ids=ids).logits[0]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-3)
    assert smollm2.tokenizer.decode(int(got[-1].argmax())).strip() == "Paris"


def _train(bb, side, data, tmp_path, epochs=1, lr=2e-3, codec="int8", bs=16):
    mgr = SessionManager(ServerConfig(workdir=str(tmp_path / "server")))
    tr = DeviceTrainer(
        bb,
        side,
        InProcessTransport(mgr),
        CodecConfig(codec),
        TrainConfig(lr=lr),
        DeviceConfig(epochs=epochs),
    )
    summary = tr.train(data, bs)
    out = tr.download(tmp_path / "side", {})
    tr.transport.close()
    return tr, summary, LocalModel.load(bb, out)


def test_sst2_side_tuning_learns(smollm2, tmp_path):
    cfg = resolve_preset(DataConfig(preset="sst2", max_train_samples=512, max_eval_samples=200))
    train = tokenize_examples(load_examples(cfg, "train"), smollm2.tokenizer, cfg)
    dev = tokenize_examples(load_examples(cfg, "eval"), smollm2.tokenizer, cfg)
    side = build_side_config(smollm2, "classification", 2, cfg.verbalizers)
    zero_shot = LocalModel.untrained(smollm2, side).evaluate(dev, 32)["accuracy"]
    tr, summary, model = _train(smollm2, side, train, tmp_path)
    losses = [r.loss for r in tr.records]
    assert sum(losses[-8:]) / 8 < sum(losses[:8]) / 8
    # 30 taps x (576 + 4 bytes + 36-byte header) per sample, one row per sample
    assert summary["bytes_per_sample"] == pytest.approx(30 * (580 + 36 / 16), rel=0.01)
    after = model.evaluate(dev, 32)["accuracy"]
    assert zero_shot > 0.6 and after > 0.75


def _reviews(n, seed):
    rnd = random.Random(seed)
    good = ["wonderful", "moving", "funny", "gorgeous", "smart", "delightful"]
    bad = ["dull", "clumsy", "boring", "tedious", "messy", "lifeless"]
    nouns = ["film", "script", "cast", "story", "ending", "soundtrack"]
    rows = []
    for _ in range(n):
        pos = rnd.random() < 0.5
        adj = rnd.choice(good if pos else bad)
        text = f"Review: the {rnd.choice(nouns)} is {adj} and the {rnd.choice(nouns)} too"
        rows.append(LMExample(text, f"Verdict: {'positive' if pos else 'negative'}."))
    return rows


def test_causal_lm_tuning_lowers_held_out_loss_and_generates(smollm2, tmp_path):
    cfg = DataConfig(task="causal_lm", batch_size=8, max_length=64)
    train = tokenize_examples(_reviews(96, 0), smollm2.tokenizer, cfg)
    held = tokenize_examples(_reviews(24, 1), smollm2.tokenizer, cfg)
    side = build_side_config(smollm2, "causal_lm", 0, ())
    before = LocalModel.untrained(smollm2, side).evaluate(held)["loss"]
    _, _, model = _train(smollm2, side, train, tmp_path, epochs=2, lr=3e-3, bs=8)
    after = model.evaluate(held)["loss"]
    assert after < 0.5 * before, (before, after)
    text = model.generate("Review: the story is delightful and the cast too", max_new_tokens=8)
    assert text.startswith("Verdict:"), text
    meta = json.loads((tmp_path / "side" / "side.json").read_text())
    assert meta["side"]["task"] == "causal_lm"


def test_split_learner_reproduces_smollm2_at_init(smollm2):
    """The server's top 8 layers (rebuilt from the upload) continue the device's forward pass
    exactly: untrained split logits equal the whole backbone's, on real SST-2 sentences."""
    from mobillm.backbone import Backbone
    from mobillm.data import collate
    from mobillm.device.rows import plan_rows
    from mobillm.side.head import FrozenHead
    from mobillm.side.learner import build_learner

    bb = Backbone(smollm2.model, smollm2.tokenizer, smollm2.cfg)  # its own taps and split
    cfg = resolve_preset(DataConfig(preset="sst2", max_eval_samples=8))
    dev = tokenize_examples(load_examples(cfg, "eval"), bb.tokenizer, cfg)
    side = build_side_config(bb, "classification", 2, cfg.verbalizers, kind="split", split_layers=8)
    batch = collate(dev, list(range(8)))
    with torch.inference_mode():
        full = bb.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    last = batch.attention_mask.sum(1) - 1
    want = full[torch.arange(8), last][:, list(side.verbalizer_ids)]
    plan = plan_rows(batch, "valid")
    rows = []
    bb.run(batch.input_ids, batch.attention_mask, lambda tap, h: rows.append(plan.gather(h)))
    head = FrozenHead(*bb.export_head(side.head_rows))
    layers = {k: v.clone() for k, v in bb.top_layers(8)[1].items()}
    server = build_learner(side, head, layers)
    with torch.no_grad():
        got = server.logits(
            server.finish(server.step(None, 0, rows[0], plan.rows_per_sample)), plan.pool_rows
        )
    assert bb.taps == (21,) and len(rows) == 1
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
