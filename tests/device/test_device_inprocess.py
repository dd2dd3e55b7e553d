"""Device and server end to end through the in-process transport, on tiny real models."""

import dataclasses
import json
import random

import pytest
import torch

from mobillm.codec import CodecConfig
from mobillm.data import ClassificationExample, DataConfig, LMExample, tokenize_examples
from mobillm.device.local import LocalModel
from mobillm.device.runtime import DeviceConfig, DeviceTrainer, build_side_config
from mobillm.server.inprocess import InProcessTransport
from mobillm.server.sessions import ServerConfig, SessionManager
from mobillm.side.io import SideFileError
from mobillm.transport.messages import TrainConfig


def _cls_data(tok, n=192, seed=0):
    rnd = random.Random(seed)
    heads = ["the quick fox", "lazy dog", "it 's a journey"]
    ex = []
    for _ in range(n):
        word = rnd.choice(["good", "bad"])
        ex.append(ClassificationExample(f"{rnd.choice(heads)} {word}", int(word == "good")))
    cfg = DataConfig(labels=("0", "1"), verbalizers=("bad", "good"), batch_size=16)
    return tokenize_examples(ex, tok, cfg), cfg


def _trainer(bb, side, mgr, codec="int8", positions="loss", window=2, epochs=2, lr=5e-3):
    return DeviceTrainer(
        bb,
        side,
        InProcessTransport(mgr),
        CodecConfig(codec),
        TrainConfig(lr=lr),
        DeviceConfig(positions=positions, window=window, epochs=epochs, private_labels=False),
    )


@pytest.mark.parametrize(
    ("codec", "positions", "pooling", "min_acc"),
    # mean pooling dilutes the one decisive token among several, so it learns slower
    [("int8", "loss", "last", 0.95), ("int4", "valid", "mean", 0.8), ("fp16", "all", "last", 0.95)],
)
def test_classification_learns_and_downloads(
    tmp_path, make_tiny_backbone, codec, positions, pooling, min_acc
):
    bb = make_tiny_backbone("llama")
    data, cfg = _cls_data(bb.tokenizer)
    side = build_side_config(bb, "classification", 2, cfg.verbalizers, pooling=pooling)
    mgr = SessionManager(ServerConfig(workdir=str(tmp_path / "server")))
    before = LocalModel.untrained(bb, side).evaluate(data)["accuracy"]
    tr = _trainer(bb, side, mgr, codec, positions, epochs=4, lr=1e-2)
    progress = []
    summary = tr.train(data, 16, progress=progress.append)
    # the device streams 12 steps once; the server replays 3 more epochs from its cache
    steps = [m for m in progress if "step" in m]
    assert summary["steps"] == 12 and len(steps) == 12
    assert steps[-1]["step"] == 12 and steps[-1]["mb_sent"] > 0
    assert [m["epoch"] for m in progress if "epoch" in m] == [1, 2, 3, 4]
    assert summary["server_epochs"] == 4 and summary["device_forward_passes_per_sample"] == 1.0
    assert summary["epochs"][-1]["train_loss"] < tr.records[0].loss
    out = tr.download(tmp_path / "side", {"data": {"labels": ["0", "1"]}})
    server_blob = mgr.download(tr.info.session_id, tr.info.token)
    assert (out / "side.safetensors").read_bytes() == server_blob.weights
    assert json.loads((out / "side.json").read_text())["task"]["data"]["labels"] == ["0", "1"]
    assert tr.transport.close()["optimizer_steps"] == 48
    after = LocalModel.load(bb, out).evaluate(data)["accuracy"]
    assert after >= min_acc and after > before


def test_window_one_and_bytes_accounting(tmp_path, make_tiny_backbone):
    bb = make_tiny_backbone("gpt2")
    data, cfg = _cls_data(bb.tokenizer, n=32)
    side = build_side_config(bb, "classification", 2, cfg.verbalizers)
    tr = _trainer(bb, side, SessionManager(ServerConfig(workdir=str(tmp_path))), window=1, epochs=1)
    s = tr.train(data, 16)
    # int8 rows: 32 samples x 3 taps x (32 + 4) bytes + 36-byte headers per frame
    assert s["bytes_encoded"] == 32 * 3 * 36 + 2 * 3 * 36
    assert s["bytes_sent"] > s["bytes_encoded"]  # plus labels and chunk headers


def test_causal_lm_learns_a_fixed_reply_and_generates_it(tmp_path, make_tiny_backbone):
    bb = make_tiny_backbone("qwen2")
    rnd = random.Random(0)
    prompts = ["the quick brown fox", "lazy dog", "a bad movie", "a good movie", "journey"]
    ex = [LMExample(rnd.choice(prompts), "Answer: four") for _ in range(96)]
    cfg = DataConfig(task="causal_lm", batch_size=8)
    data = tokenize_examples(ex, bb.tokenizer, cfg)
    side = build_side_config(bb, "causal_lm", 0, (), dropout=0.0, reduction=2)
    mgr = SessionManager(ServerConfig(workdir=str(tmp_path / "server")))
    before = LocalModel.untrained(bb, side).evaluate(data)["loss"]
    tr = _trainer(bb, side, mgr, epochs=12, lr=1e-2)
    tr.train(data, 8)
    out = tr.download(tmp_path / "side", {})
    tr.transport.close()
    model = LocalModel.load(bb, out)
    assert model.evaluate(data)["loss"] < 0.25 * before
    assert model.generate("lazy dog", max_new_tokens=8) == "Answer: four"


def test_side_for_another_backbone_is_refused(tmp_path, make_tiny_backbone):
    bb = make_tiny_backbone("llama")
    data, cfg = _cls_data(bb.tokenizer, n=16)
    side = build_side_config(bb, "classification", 2, cfg.verbalizers)
    tr = _trainer(bb, side, SessionManager(ServerConfig(workdir=str(tmp_path))), epochs=1)
    tr.train(data, 16)
    out = tr.download(tmp_path / "side", {})
    with pytest.raises(SideFileError, match="another backbone"):
        LocalModel.load(make_tiny_backbone("llama", seed=3), out)


def test_local_eval_matches_server_network(tmp_path, make_tiny_backbone):
    """Predictions on the device equal those of the server's own copy of the side network."""
    from mobillm.side.head import FrozenHead

    bb = make_tiny_backbone("opt")
    data, cfg = _cls_data(bb.tokenizer, n=48)
    side = build_side_config(bb, "classification", 2, cfg.verbalizers)
    mgr = SessionManager(ServerConfig(workdir=str(tmp_path)))
    tr = _trainer(bb, side, mgr, epochs=1)
    tr.train(data, 16)
    out = tr.download(tmp_path / "side", {})
    server_net = mgr._sessions[tr.info.session_id].trainer.net.eval()
    local = LocalModel.load(bb, out)
    ref = LocalModel(bb, server_net)
    assert local.evaluate(data)["predictions"] == ref.evaluate(data)["predictions"]
    assert isinstance(server_net.frozen, FrozenHead)
    with torch.no_grad():
        for k, v in server_net.trainable_state().items():
            assert torch.equal(v, local.side.trainable_state()[k])


def test_attention_mixer_trains_over_valid_rows(tmp_path, make_tiny_backbone):
    bb = make_tiny_backbone("qwen2")
    data, cfg = _cls_data(bb.tokenizer)
    side = build_side_config(
        bb, "classification", 2, cfg.verbalizers, mixer="attention", mixer_heads=2
    )
    mgr = SessionManager(ServerConfig(workdir=str(tmp_path / "server")))
    with pytest.raises(Exception, match="positions='valid'"):
        _trainer(bb, side, mgr, positions="loss").train(data, 16)
    tr = _trainer(
        bb,
        side,
        SessionManager(ServerConfig(workdir=str(tmp_path / "s2"))),
        positions="valid",
        epochs=6,
    )
    tr.train(data, 16)
    out = tr.download(tmp_path / "side", {})
    tr.transport.close()
    assert LocalModel.load(bb, out).evaluate(data)["accuracy"] >= 0.9


@pytest.mark.parametrize(("positions", "pooling"), [("loss", "last"), ("valid", "mean")])
def test_replayed_epochs_equal_restreamed_ones(tmp_path, make_tiny_backbone, positions, pooling):
    """Epochs the server replays from its cache train exactly as epochs the device re-streams."""
    bb = make_tiny_backbone("llama")
    data, cfg = _cls_data(bb.tokenizer, n=64)
    side = build_side_config(bb, "classification", 2, cfg.verbalizers, pooling=pooling)
    weights, passes = [], []
    for replay in (True, False):
        mgr = SessionManager(ServerConfig(workdir=str(tmp_path / str(replay))))
        tr = DeviceTrainer(
            bb,
            side,
            InProcessTransport(mgr),
            CodecConfig("int8"),
            TrainConfig(lr=5e-3),
            DeviceConfig(positions=positions, epochs=3, replay=replay, private_labels=False),
        )
        summary = tr.train(data, 16)
        weights.append(tr.transport.download().weights)
        passes.append(summary["device_forward_passes_per_sample"])
        assert tr.transport.close()["optimizer_steps"] == 12
    assert weights[0] == weights[1]
    assert passes == [1.0, 3.0]  # replayed epochs cost the device no forward pass


def test_validation_keeps_the_untrained_network_when_training_hurts(tmp_path, make_tiny_backbone):
    """Labels that contradict the validation split: no epoch beats the frozen backbone."""
    bb = make_tiny_backbone("llama")
    data, cfg = _cls_data(bb.tokenizer, n=64)
    flipped = dataclasses.replace(data, labels=[1 - y for y in data.labels])
    side = build_side_config(bb, "classification", 2, cfg.verbalizers)
    mgr = SessionManager(ServerConfig(workdir=str(tmp_path)))
    tr = _trainer(bb, side, mgr, epochs=3, lr=2e-2)
    summary = tr.train(flipped, 16, validation=data)
    assert [e["epoch"] for e in summary["epochs"]] == [1, 2, 3]
    assert summary["kept_epoch"] == 0
    last = summary["epochs"][-1]
    assert all(e["val_accuracy"] < last["untrained_val_accuracy"] for e in summary["epochs"])
    blob = tr.transport.download()
    untrained = LocalModel.untrained(bb, side).side.trainable_state()
    from mobillm.side.io import weights_from_bytes

    kept = weights_from_bytes(blob.weights)
    assert all(torch.equal(kept[k], untrained[k]) for k in untrained)
    tr.transport.close()


def test_validation_keeps_the_best_epoch(tmp_path, make_tiny_backbone):
    bb = make_tiny_backbone("llama")
    data, cfg = _cls_data(bb.tokenizer, n=96)
    val, _ = _cls_data(bb.tokenizer, n=32, seed=1)
    side = build_side_config(bb, "classification", 2, cfg.verbalizers)
    mgr = SessionManager(ServerConfig(workdir=str(tmp_path)))
    tr = _trainer(bb, side, mgr, epochs=3)
    summary = tr.train(data, 16, validation=val)
    accs = [e["val_accuracy"] for e in summary["epochs"]]
    kept = summary["kept_epoch"]
    assert kept >= 1 and accs[kept - 1] == max(accs)
    # the download is the kept epoch: the device alone scores what the server scored
    out = tr.download(tmp_path / "side", {})
    tr.transport.close()
    assert LocalModel.load(bb, out).evaluate(val)["accuracy"] == pytest.approx(accs[kept - 1])
    assert summary["device_forward_passes_per_sample"] == 1.0
