"""The server's activation cache: spilled steps replay exactly; budgets are enforced."""

import random

import pytest

from mobillm.codec import CodecConfig
from mobillm.data import ClassificationExample, DataConfig, tokenize_examples
from mobillm.device.runtime import DeviceConfig, DeviceTrainer, build_side_config
from mobillm.server.inprocess import InProcessTransport
from mobillm.server.sessions import ServerConfig, SessionManager
from mobillm.transport.messages import RemoteError, TrainConfig


def _run(bb, tmp_path, name, epochs=3, **server):
    rnd = random.Random(0)
    ex = [
        ClassificationExample(f"the fox {w}", int(w == "good"))
        for w in (rnd.choice(["good", "bad"]) for _ in range(48))
    ]
    cfg = DataConfig(labels=("0", "1"), verbalizers=("bad", "good"))
    data = tokenize_examples(ex, bb.tokenizer, cfg)
    val = tokenize_examples(ex[:16], bb.tokenizer, cfg)
    side = build_side_config(bb, "classification", 2, cfg.verbalizers)
    mgr = SessionManager(ServerConfig(workdir=str(tmp_path / name), **server))
    tr = DeviceTrainer(
        bb,
        side,
        InProcessTransport(mgr),
        CodecConfig("int8"),
        TrainConfig(lr=5e-3),
        DeviceConfig(epochs=epochs, private_labels=False),
    )
    summary = tr.train(data, 16, validation=val)
    weights = tr.transport.download().weights
    c = mgr._sessions[tr.info.session_id].trainer.cache
    cache = {"memory": c.memory_bytes, "disk": c.disk_bytes}
    spilled = sorted((tmp_path / name).rglob("step-*.safetensors"))
    tr.transport.close()
    left = sorted((tmp_path / name).rglob("step-*.safetensors"))
    return summary, weights, cache, spilled, left


def test_spilled_cache_replays_exactly(tmp_path, make_tiny_backbone):
    bb = make_tiny_backbone("llama")
    s_mem, w_mem, c_mem, spilled_mem, _ = _run(bb, tmp_path, "memory")
    s_disk, w_disk, c_disk, spilled, left = _run(
        bb, tmp_path, "disk", cache_memory_bytes=2000, cache_disk_bytes=1 << 20
    )
    # every step is on disk (a restarted server needs them); memory holds what fits
    assert spilled_mem and c_mem["disk"] == c_disk["disk"] > 0
    assert spilled and c_disk["memory"] <= 2000 < c_mem["memory"] == c_mem["disk"]
    assert w_disk == w_mem
    assert [e["val_accuracy"] for e in s_disk["epochs"]] == [
        e["val_accuracy"] for e in s_mem["epochs"]
    ]
    assert not left  # the session's cache went with it


def test_full_cache_is_refused_and_a_cacheless_server_asks_for_restreaming(
    tmp_path, make_tiny_backbone
):
    bb = make_tiny_backbone("llama")
    with pytest.raises(RemoteError, match="activation cache full") as e:
        _run(bb, tmp_path, "tiny", cache_memory_bytes=1 << 20, cache_disk_bytes=1000)
    assert e.value.code == "RESOURCE_EXHAUSTED"
    with pytest.raises(RemoteError, match="re-stream every epoch") as e:
        _run(bb, tmp_path, "none", cache_memory_bytes=0, cache_disk_bytes=0)
    assert e.value.code == "FAILED_PRECONDITION"
