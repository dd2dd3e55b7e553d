"""Private-label mode: the standard mode's training, with the labels kept on the device."""

import random

import pytest
import torch
from safetensors.torch import load

from mobillm.codec import CodecConfig
from mobillm.data import ClassificationExample, DataConfig, LMExample, tokenize_examples
from mobillm.device.local import LocalModel
from mobillm.device.runtime import DeviceConfig, DeviceTrainer, build_side_config
from mobillm.server.inprocess import InProcessTransport
from mobillm.server.sessions import ServerConfig, SessionManager
from mobillm.transport.messages import Gradient, RemoteError, StepBegin, TrainConfig


class Recording(InProcessTransport):
    """Keeps every message the device sends."""

    def __init__(self, manager):
        super().__init__(manager)
        self.sent = []

    def _deliver(self, msg):
        self.sent.append(msg)
        return super()._deliver(msg)


def _cls(tok, n, seed):
    rnd = random.Random(seed)
    heads = ["the quick fox", "lazy dog", "it 's a journey"]
    ex = []
    for _ in range(n):
        word = rnd.choice(["good", "bad"])
        ex.append(ClassificationExample(f"{rnd.choice(heads)} {word}", int(word == "good")))
    cfg = DataConfig(labels=("0", "1"), verbalizers=("bad", "good"), batch_size=8)
    return tokenize_examples(ex, tok, cfg), cfg


def _lm(tok, n, seed):
    rnd = random.Random(seed)
    prompts = ["the quick brown fox", "lazy dog", "a bad movie", "a good movie", "journey"]
    ex = [LMExample(rnd.choice(prompts), "Answer: four") for _ in range(n)]
    return tokenize_examples(ex, tok, DataConfig(task="causal_lm", batch_size=8))


def _run(tmp_path, bb, side, data, val, private, name, epochs=3, window=2):
    mgr = SessionManager(ServerConfig(workdir=str(tmp_path / name)))
    transport = Recording(mgr)
    tr = DeviceTrainer(
        bb,
        side,
        transport,
        CodecConfig("int8"),
        TrainConfig(lr=1e-2, label_smoothing=0.1 if side.task == "classification" else 0.0),
        DeviceConfig(window=window, epochs=epochs, private_labels=private),
    )
    summary = tr.train(data, 8, validation=val)
    out = tr.download(tmp_path / f"{name}-side", {})
    tr.transport.close()
    return tr, summary, out, transport.sent


def _train_losses(tr):
    return [r.loss for r in tr.records if not r.metrics.get("validation")]


def _assert_same_run(ref, got):
    (tr_a, sum_a, out_a, _), (tr_b, sum_b, out_b, _) = ref, got
    a, b = _train_losses(tr_a), _train_losses(tr_b)
    # the standard device streams epoch 1; its server replays the other two and reports
    # their mean losses; the private device sends all three epochs' steps itself
    n = len(a)
    assert n >= 6 and len(b) == 3 * n
    assert b[:n] == pytest.approx(a, abs=1e-5)
    epochs = [e["train_loss"] for e in sum_a["epochs"]]
    means = [sum(b[i * n : (i + 1) * n]) / n for i in range(3)]
    assert means == pytest.approx(epochs, abs=1e-5)
    # the device's own epoch reports say what the standard server's say
    assert [e["epoch"] for e in sum_b["epochs"]] == [1, 2, 3]
    for ea, eb in zip(sum_a["epochs"], sum_b["epochs"], strict=True):
        for k in ("train_loss", "val_loss", "val_accuracy"):
            if k in ea:
                assert eb[k] == pytest.approx(ea[k], abs=1e-5), k
    for k in ("best_epoch", "untrained_val_loss"):
        assert sum_b["epochs"][-1][k] == pytest.approx(sum_a["epochs"][-1][k], abs=1e-5)
    wa = load((out_a / "side.safetensors").read_bytes())
    wb = load((out_b / "side.safetensors").read_bytes())
    assert sorted(wa) == sorted(wb)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-4, rtol=1e-4)
    assert sum_a["kept_epoch"] == sum_b["kept_epoch"]


def _no_labels_sent(sent):
    begins = [m for m in sent if isinstance(m, StepBegin)]
    assert begins and all(b.labels is None and b.targets is None for b in begins)
    assert any(isinstance(m, Gradient) for m in sent)


OPTS = {
    "ladder": {},
    "split": {"kind": "split", "split_layers": 1},
    "transformer": {"kind": "transformer", "reduction": 4},  # hidden 32: width 8
}


@pytest.mark.parametrize("kind", list(OPTS))
def test_private_classification_trains_as_the_standard_mode(tmp_path, make_tiny_backbone, kind):
    runs = []
    for private in (False, True):
        bb = make_tiny_backbone("llama")
        data, cfg = _cls(bb.tokenizer, 64, 0)
        val, _ = _cls(bb.tokenizer, 16, 1)
        side = build_side_config(bb, "classification", 2, cfg.verbalizers, **OPTS[kind])
        runs.append(_run(tmp_path, bb, side, data, val, private, f"{kind}-{private}"))
    _assert_same_run(*runs)
    _, summary, out, sent = runs[1]
    _no_labels_sent(sent)
    # the device drove the cache epochs: 8 streamed steps, 16 replayed, 2 x 4 validation
    assert summary["device_forward_passes_per_sample"] == 1.0
    assert summary["kept_epoch"] >= 1
    bb = make_tiny_backbone("llama")
    data, _ = _cls(bb.tokenizer, 64, 0)
    if kind == "split":
        build_side_config(bb, "classification", 2, ("bad", "good"), kind="split", split_layers=1)
    assert LocalModel.load(bb, out).evaluate(data)["accuracy"] >= 0.9


def test_private_causal_lm_trains_as_the_standard_mode(tmp_path, make_tiny_backbone):
    runs = []
    for private in (False, True):
        bb = make_tiny_backbone("qwen2")
        data, val = _lm(bb.tokenizer, 48, 0), _lm(bb.tokenizer, 16, 1)
        side = build_side_config(bb, "causal_lm", 0, (), dropout=0.0, reduction=2)
        runs.append(_run(tmp_path, bb, side, data, val, private, f"lm-{private}"))
    _assert_same_run(*runs)
    _no_labels_sent(runs[1][3])
    spec_rows = [m.loss_mask for m in runs[1][3] if isinstance(m, StepBegin)]
    assert all(m is not None and m.dtype == torch.bool for m in spec_rows)


class Crashing(InProcessTransport):
    """Dies (as a device process would) after ``after`` messages."""

    def __init__(self, manager, after):
        super().__init__(manager)
        self.after, self.sent = after, 0

    def _deliver(self, msg):
        self.sent += 1
        if self.sent > self.after:
            raise SystemError("device crashed")
        return super()._deliver(msg)


@pytest.mark.parametrize("after", [23, 45])
def test_a_restarted_device_resumes_from_its_state_folder(tmp_path, make_tiny_backbone, after):
    bb = make_tiny_backbone("llama")
    data, cfg = _cls(bb.tokenizer, 32, 0)
    val, _ = _cls(bb.tokenizer, 16, 1)
    side = build_side_config(bb, "classification", 2, cfg.verbalizers, dropout=0.1)

    def trainer(transport, out):
        device = DeviceConfig(epochs=3, private_labels=True, reconnect_seconds=30)
        return DeviceTrainer(bb, side, transport, CodecConfig("int8"),
                             TrainConfig(lr=1e-2), device, state_dir=out)  # fmt: skip

    ref = trainer(
        InProcessTransport(SessionManager(ServerConfig(workdir=str(tmp_path / "a")))),
        tmp_path / "ra",
    )
    ref_summary = ref.train(data, 8, validation=val)
    ref_out = ref.download(tmp_path / "ref-side", {})

    mgr = SessionManager(ServerConfig(workdir=str(tmp_path / "b"), checkpoint_every=3))
    first = trainer(Crashing(mgr, after), tmp_path / "rb")
    with pytest.raises(RemoteError, match="device crashed"):
        first.train(data, 8, validation=val)
    info = first.info
    # a new process: no state in memory, the session and the state folder on disk
    second = trainer(InProcessTransport(mgr), tmp_path / "rb")
    second.start(data, 8, session=info)
    summary = second.train(data, 8, validation=val)
    out = second.download(tmp_path / "side", {})
    assert summary["kept_epoch"] == ref_summary["kept_epoch"]
    a = load((ref_out / "side.safetensors").read_bytes())
    b = load((out / "side.safetensors").read_bytes())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # without a state folder a restarted device is refused, clearly
    lost = trainer(InProcessTransport(mgr), None)
    with pytest.raises(RemoteError, match="kept no state of its classifier"):
        lost.start(data, 8, session=info)


class Flaky(InProcessTransport):
    """Fails the link once, while the device waits on an epoch's validation pass."""

    def __init__(self, manager):
        super().__init__(manager)
        self.failed = False

    def download(self):
        if not self.failed:
            self.failed = True
            self._fail(RemoteError("UNAVAILABLE", "link lost"))
            raise RemoteError("UNAVAILABLE", "link lost")
        return super().download()


def test_a_reconnect_while_scoring_keeps_each_epochs_score(tmp_path, make_tiny_backbone):
    runs = []
    for transport in (InProcessTransport, Flaky):
        bb = make_tiny_backbone("llama")
        data, cfg = _cls(bb.tokenizer, 32, 0)
        val, _ = _cls(bb.tokenizer, 16, 1)
        side = build_side_config(bb, "classification", 2, cfg.verbalizers)
        mgr = SessionManager(ServerConfig(workdir=str(tmp_path / transport.__name__)))
        tr = DeviceTrainer(
            bb,
            side,
            transport(mgr),
            CodecConfig("int8"),
            TrainConfig(lr=1e-2),
            DeviceConfig(epochs=3, private_labels=True, reconnect_seconds=30),
        )
        runs.append((tr, tr.train(data, 8, validation=val)))
    (_, ref), (tr, got) = runs
    assert tr.reconnects == 1
    assert [e["val_loss"] for e in got["epochs"]] == [e["val_loss"] for e in ref["epochs"]]
    assert got["kept_epoch"] == ref["kept_epoch"]


def test_a_stopped_private_run_keeps_what_it_trained(tmp_path, make_tiny_backbone):
    bb = make_tiny_backbone("llama")
    data, cfg = _cls(bb.tokenizer, 32, 0)
    val, _ = _cls(bb.tokenizer, 16, 1)
    side = build_side_config(bb, "classification", 2, cfg.verbalizers)
    mgr = SessionManager(ServerConfig(workdir=str(tmp_path)))
    device = DeviceConfig(epochs=3, private_labels=True)
    tr = DeviceTrainer(bb, side, InProcessTransport(mgr), device=device)
    sent = []
    tr.train(data, 8, validation=val, stop=lambda: len(sent.append(1) or sent) > 6)
    out = tr.download(tmp_path / "side", {})
    weights = load((out / "side.safetensors").read_bytes())
    current = mgr.download(tr.info.session_id, tr.info.token)
    server = load(current.weights)
    assert all(torch.equal(weights[k], server[k]) for k in server)
    assert torch.equal(weights["classifier.weight"], tr.labels.state()["classifier.weight"])
