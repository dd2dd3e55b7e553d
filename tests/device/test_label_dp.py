"""Randomized response on the training labels (``DeviceConfig.label_epsilon``): the keep rate
epsilon promises, one draw per sample for the whole run, and only randomized labels reach the
server in either label mode."""

import math
import random

import pytest
import torch

from mobillm.codec import CodecConfig
from mobillm.data import ClassificationExample, DataConfig, tokenize_examples
from mobillm.device.noise import keep_probability, randomized_labels
from mobillm.device.runtime import DeviceConfig, DeviceTrainer, build_side_config
from mobillm.errors import ConfigError
from mobillm.server.inprocess import InProcessTransport
from mobillm.server.sessions import ServerConfig, SessionManager
from mobillm.transport.messages import Gradient, StepBegin, TrainConfig


def _data(n, classes=2, seed=0):
    from mobillm.data.tokenization import TokenizedDataset

    rnd = random.Random(seed)
    labels = [rnd.randrange(classes) for _ in range(n)]
    return TokenizedDataset("classification", [[i, 7] for i in range(n)], 0, labels=labels)


@pytest.mark.parametrize(("eps", "classes"), [(1.0, 2), (0.5, 3), (3.0, 4)])
def test_keep_rate_and_flips_follow_epsilon(eps, classes):
    data = _data(6000, classes)
    noisy = randomized_labels(data, eps, classes, seed=5)
    kept = sum(a == b for a, b in zip(data.labels, noisy.labels, strict=True)) / 6000
    want = math.exp(eps) / (math.exp(eps) + classes - 1)
    assert keep_probability(eps, classes) == pytest.approx(want)
    assert abs(kept - want) < 0.025, (kept, want)
    # a flip goes to each other class alike
    flips = [(a, b) for a, b in zip(data.labels, noisy.labels, strict=True) if a != b]
    to = torch.bincount(torch.tensor([(b - a) % classes for a, b in flips]), minlength=classes)
    assert to[0] == 0 and all(abs(int(c) / len(flips) - 1 / (classes - 1)) < 0.04 for c in to[1:])
    assert all(0 <= y < classes for y in noisy.labels)


def test_one_draw_per_seed_and_text():
    data = _data(400)
    a = randomized_labels(data, 1.0, 2, seed=5).labels
    assert a == randomized_labels(data, 1.0, 2, seed=5).labels
    assert a != randomized_labels(data, 1.0, 2, seed=6).labels
    with pytest.raises(ValueError):
        randomized_labels(data, 0.0, 2, seed=5)


def test_the_same_text_gets_the_same_noisy_label_wherever_it_is():
    """Keyed by the text: a duplicate, or the same sentence in another set or session, carries
    the same draw, so seeing it again tells the server nothing new."""
    from mobillm.data.tokenization import TokenizedDataset

    ids = [[i, i + 1, i + 2] for i in range(300)]
    one = TokenizedDataset("classification", ids, 0, labels=[1] * 300)
    flipped = [i for i, y in enumerate(randomized_labels(one, 0.5, 2, seed=3).labels) if y == 0]
    again = TokenizedDataset("classification", ids[::-1] + ids[:5], 0, labels=[1] * 305)
    noisy = randomized_labels(again, 0.5, 2, seed=3).labels
    assert flipped and {299 - j for j, y in enumerate(noisy[:300]) if y == 0} == set(flipped)
    assert [noisy[300 + k] == 0 for k in range(5)] == [k in flipped for k in range(5)]


def test_the_device_keeps_one_label_secret(monkeypatch, tmp_path):
    from mobillm.device.noise import device_label_secret

    monkeypatch.setenv("MOBILLM_CACHE", str(tmp_path))
    a = device_label_secret()
    assert a == device_label_secret() and (tmp_path / "label-secret").stat().st_mode & 0o077 == 0


def test_device_config_checks_epsilon(make_tiny_backbone):
    with pytest.raises(ConfigError):
        DeviceConfig(label_epsilon=-1.0)
    with pytest.raises(ConfigError):
        DeviceConfig(label_epsilon=float("inf"))
    with pytest.raises(ConfigError):
        DeviceConfig(label_seed=-2)
    bb = make_tiny_backbone("llama")
    side = build_side_config(bb, "causal_lm", 0, ())
    with pytest.raises(ConfigError, match="classification only"):
        DeviceTrainer(bb, side, None, device=DeviceConfig(label_epsilon=1.0))  # type: ignore[arg-type]


class _Wire(InProcessTransport):
    """Keeps every StepBegin and Gradient the device sends."""

    def __init__(self, manager):
        super().__init__(manager)
        self.sent: list[object] = []

    def _deliver(self, msg):
        if isinstance(msg, (StepBegin, Gradient)):
            self.sent.append(msg)
        return super()._deliver(msg)


@pytest.mark.parametrize("private", [True, False])
def test_only_randomized_labels_are_trained_on(tmp_path, make_tiny_backbone, private):
    bb = make_tiny_backbone("llama")
    rnd = random.Random(0)
    words = [rnd.choice(["good", "bad"]) for _ in range(48)]
    cfg = DataConfig(labels=("0", "1"), verbalizers=("bad", "good"))
    ex = [ClassificationExample(f"a {w} movie", int(w == "good")) for w in words]
    data = tokenize_examples(ex[:40], bb.tokenizer, cfg)
    val = tokenize_examples(ex[40:], bb.tokenizer, cfg)
    side = build_side_config(bb, "classification", 2, ("bad", "good"))
    wire = _Wire(SessionManager(ServerConfig(workdir=str(tmp_path))))
    dev = DeviceConfig(epochs=2, private_labels=private, label_epsilon=0.5, label_seed=9)
    tr = DeviceTrainer(bb, side, wire, CodecConfig("fp16"), TrainConfig(), dev)
    tr.train(data, 8, validation=val)
    wire.close()
    noisy = randomized_labels(data, 0.5, 2, seed=9).labels
    assert noisy != data.labels  # some were flipped at eps 0.5 (38% each)
    trained = [s for s in tr.plan if not s.validation]
    assert trained and all(s.data.labels == noisy for s in trained)
    begins = [m for m in wire.sent if isinstance(m, StepBegin)]
    if private:
        assert all(m.labels is None for m in begins)
        assert all(s.data.labels == val.labels for s in tr.plan if s.validation)
    else:  # what reaches the server is the randomized labels, validation's included
        val_noisy = randomized_labels(val, 0.5, 2, seed=9).labels
        for m in begins:
            item = tr.plan[m.step]
            want = val_noisy if m.validation else noisy
            assert m.labels.tolist() == [want[i] for i in item.idx]
