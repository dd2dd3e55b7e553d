"""Frame noise (``DeviceConfig.frame_noise``): the same bytes for the same (seed, step, tap),
other bytes for another step, tap or seed, and a run whose resent steps repeat themselves."""

import random

import pytest
import torch

from mobillm.codec import CodecConfig
from mobillm.data import ClassificationExample, DataConfig, tokenize_examples
from mobillm.device.noise import add_frame_noise
from mobillm.device.runtime import DeviceConfig, DeviceTrainer, build_side_config
from mobillm.errors import ConfigError
from mobillm.server.inprocess import InProcessTransport
from mobillm.server.sessions import ServerConfig, SessionManager
from mobillm.transport.messages import ActivationChunk, TrainConfig


def test_noise_is_a_function_of_seed_step_and_tap():
    x = torch.randn(5, 64) * torch.arange(1, 6).unsqueeze(1)  # rows of different scales
    a = add_frame_noise(x, 0.5, seed=7, step=3, tap=2)
    assert torch.equal(a, add_frame_noise(x, 0.5, seed=7, step=3, tap=2))
    for other in ({"seed": 8, "step": 3, "tap": 2}, {"seed": 7, "step": 4, "tap": 2},
                  {"seed": 7, "step": 3, "tap": 1}):  # fmt: skip
        assert not torch.allclose(a, add_frame_noise(x, 0.5, **other))
    assert torch.equal(add_frame_noise(x, 0.0, 7, 3, 2), x)
    # the noise's spread follows each row's RMS: relative std near 0.5 on every row
    rel = (a - x).std(1) / x.pow(2).mean(1).sqrt()
    assert torch.all((rel > 0.35) & (rel < 0.65)), rel
    with pytest.raises(ValueError):
        add_frame_noise(x, -1.0, 7, 3, 2)


def test_device_config_checks_the_noise():
    with pytest.raises(ConfigError):
        DeviceConfig(frame_noise=-0.1)
    with pytest.raises(ConfigError):
        DeviceConfig(frame_noise_seed=-2)
    cfg = DeviceConfig(frame_noise=0.5, frame_noise_seed=3)
    assert DeviceConfig.from_json(cfg.to_json()) == cfg


class _Frames(InProcessTransport):
    """Keeps the activation bytes of every (step, tap) the device sends."""

    def __init__(self, manager):
        super().__init__(manager)
        self.frames: dict[tuple[int, int], bytes] = {}

    def _deliver(self, msg):
        if isinstance(msg, ActivationChunk):
            key = (msg.step, msg.tap)
            self.frames[key] = self.frames.get(key, b"") + bytes(msg.data)
        return super()._deliver(msg)


def _cls(tok, n):
    rnd = random.Random(0)
    ex = [ClassificationExample(f"a {w} movie", int(w == "good")) for w in
          (rnd.choice(["good", "bad"]) for _ in range(n))]  # fmt: skip
    return tokenize_examples(ex, tok, DataConfig(labels=("0", "1"), verbalizers=("bad", "good")))


def _frames(tmp_path, bb, data, name, **device):
    side = build_side_config(bb, "classification", 2, ("bad", "good"))
    transport = _Frames(SessionManager(ServerConfig(workdir=str(tmp_path / name))))
    cfg = DeviceConfig(epochs=1, **device)
    tr = DeviceTrainer(bb, side, transport, CodecConfig("fp16"), TrainConfig(), cfg)
    tr.train(data, 8)
    transport.close()
    return tr, transport.frames


def test_noisy_frames_repeat_under_the_same_seed(tmp_path, make_tiny_backbone):
    bb = make_tiny_backbone("llama")
    data = _cls(bb.tokenizer, 16)
    _, clean = _frames(tmp_path, bb, data, "clean")
    tr, a = _frames(tmp_path, bb, data, "a", frame_noise=0.5, frame_noise_seed=11)
    _, b = _frames(tmp_path, bb, data, "b", frame_noise=0.5, frame_noise_seed=11)
    _, c = _frames(tmp_path, bb, data, "c", frame_noise=0.5, frame_noise_seed=12)
    assert tr.noise_seed == 11 and len(a) == len(clean) >= 2
    assert a == b  # what a resent step, or a resumed run with the saved seed, sends again
    assert all(a[k] != clean[k] and a[k] != c[k] for k in a)
    # left unset, the seed is secret and fresh: two sessions' noise differ
    t1, _ = _frames(tmp_path, bb, data, "d", frame_noise=0.5)
    t2, _ = _frames(tmp_path, bb, data, "e", frame_noise=0.5)
    assert t1.noise_seed != t2.noise_seed
