"""Learners built at once in several threads (a server's sessions, an in-process device's
classifier) each start from their own seed's weights."""

import threading

import torch

from mobillm.codec import CodecConfig
from mobillm.device.labels import LabelHead
from mobillm.device.runtime import build_session
from mobillm.server.trainer import Trainer
from mobillm.side.config import SideConfig
from mobillm.side.head import FrozenHead
from mobillm.transport.messages import TrainConfig


def test_concurrent_builds_draw_from_their_own_seeds(make_tiny_backbone):
    bb = make_tiny_backbone("llama")
    side = SideConfig(hidden_size=bb.hidden_size, num_taps=len(bb.taps), head_init="random")
    spec, tensors = build_session(bb, side, CodecConfig("int8"), TrainConfig(seed=3), "loss", True)
    head = FrozenHead(spec.head, tensors)

    def server_weights():
        return Trainer(spec, head).net.trainable_state()

    def device_weights():
        return LabelHead(spec.side, head, TrainConfig(seed=4)).classifier.state_dict()

    want_server, want_device = server_weights(), device_weights()
    bad: list[str] = []
    stop = threading.Event()

    def device_loop():
        while not stop.is_set():
            got = device_weights()
            if any(not torch.equal(got[k], v) for k, v in want_device.items()):
                bad.append("device")

    t = threading.Thread(target=device_loop)
    t.start()
    try:
        for _ in range(60):
            got = server_weights()
            if any(not torch.equal(got[k], v) for k, v in want_server.items()):
                bad.append("server")
    finally:
        stop.set()
        t.join(60)
    assert not bad, f"{len(bad)} builds drew from another build's seed: {sorted(set(bad))}"
