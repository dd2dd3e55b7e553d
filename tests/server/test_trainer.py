"""The server's trainer on real codec frames from a tiny backbone: learns, and refuses bad input."""

import math

import pytest
import torch

from mobillm.codec import CodecConfig, encode
from mobillm.device.runtime import build_session
from mobillm.server.trainer import Trainer
from mobillm.side.config import SideConfig
from mobillm.side.head import FrozenHead
from mobillm.side.optim import lr_lambda
from mobillm.transport.messages import (
    ActivationChunk,
    Gradient,
    RemoteError,
    StepBegin,
    TrainConfig,
    chunk_frame,
)


def _setup(bb, codec="int8", task="classification", lr=1e-2, dropout=0.0):
    side = SideConfig(
        hidden_size=bb.hidden_size,
        num_taps=len(bb.taps),
        task=task,
        head_init="random",
        dropout=dropout,
    )
    spec, head = build_session(bb, side, CodecConfig(codec), TrainConfig(lr=lr, total_steps=40))
    return Trainer(spec, FrozenHead(spec.head, head)), spec


def _frames(bb, ids, codec="int8"):
    frames = []
    bb.run(
        ids,
        torch.ones_like(ids),
        lambda tap, h: frames.append(encode(h[:, -1, :].float(), CodecConfig(codec))),
    )
    return frames


def _step(trainer, spec, step, frames, labels, chunk=1 << 20):
    b = labels.numel()
    trainer.begin(StepBegin("s", step, torch.ones(b, dtype=torch.int32), torch.arange(b), labels))
    ack = None
    for tap, f in enumerate(frames):
        for c in chunk_frame("s", step, tap, f, chunk):
            ack = trainer.add_chunk(c)
    return ack


def test_learns_a_separable_task(make_tiny_backbone):
    bb = make_tiny_backbone("llama")
    trainer, spec = _setup(bb)
    torch.manual_seed(0)
    ids = torch.randint(3, 300, (16, 4))
    labels = (ids[:, -1] % 2).long()  # the label is a function of the last token
    frames = _frames(bb, ids)
    losses = [_step(trainer, spec, s, frames, labels, chunk=100).loss for s in range(40)]
    assert losses[-1] < 0.5 * losses[0]
    assert trainer.steps_done == 40 and trainer.samples_seen == 640


def test_dropout_masks_do_not_depend_on_other_sessions(make_tiny_backbone):
    bb = make_tiny_backbone("llama")
    ids = torch.randint(3, 300, (8, 4), generator=torch.Generator().manual_seed(1))
    labels = (ids[:, -1] % 2).long()
    frames = _frames(bb, ids)
    alone, _ = _setup(bb, dropout=0.3)
    ref = [_step(alone, None, s, frames, labels).loss for s in range(4)]
    # the same session again, while another session and stray global draws interleave
    busy, _ = _setup(bb, dropout=0.3)
    other, _ = _setup(bb, dropout=0.3)
    got = []
    for s in range(4):
        torch.rand(1000)
        _step(other, None, s, frames, labels)
        got.append(_step(busy, None, s, frames, labels).loss)
    assert got == ref
    # and dropout is live: a different seed gives different losses
    side = _setup(bb, dropout=0.3)[0]
    side.net.seed_dropout(12345)
    assert [_step(side, None, s, frames, labels).loss for s in range(4)] != ref


def test_lr_schedule_warmup_and_decay():
    f = lr_lambda(100, 0.1, "cosine")
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5, abs=0.02) and f(99) < 0.01
    assert lr_lambda(100, 0.1, "linear")(55) == pytest.approx(0.5, abs=0.02)
    assert lr_lambda(0, 0.1, "cosine")(1000) == 1.0


def _expect(code, fn, match=None):
    with pytest.raises(RemoteError) as e:
        fn()
    assert e.value.code == code
    if match:
        assert match in e.value.message


def test_rejects_bad_messages(make_tiny_backbone):
    bb = make_tiny_backbone("llama")
    trainer, spec = _setup(bb)
    ids = torch.randint(3, 300, (2, 4))
    frames = _frames(bb, ids)
    ok = StepBegin("s", 0, torch.ones(2, dtype=torch.int32), torch.arange(2), torch.tensor([0, 1]))
    _expect(
        "FAILED_PRECONDITION",
        lambda: trainer.add_chunk(ActivationChunk("s", 0, 0, 0, True, frames[0])),
    )
    _expect(
        "FAILED_PRECONDITION",
        lambda: trainer.begin(StepBegin("s", 5, ok.rows_per_sample, ok.pool_rows, ok.labels)),
    )
    _expect(
        "INVALID_ARGUMENT",
        lambda: trainer.begin(
            StepBegin("s", 0, ok.rows_per_sample, ok.pool_rows, torch.tensor([0, 7]))
        ),
        "labels",
    )
    _expect(
        "INVALID_ARGUMENT",
        lambda: trainer.begin(
            StepBegin("s", 0, ok.rows_per_sample, torch.tensor([0, 9]), ok.labels)
        ),
        "pool_rows",
    )
    _expect(
        "INVALID_ARGUMENT",
        lambda: trainer.begin(StepBegin("s", 0, ok.rows_per_sample, ok.pool_rows, None)),
    )
    trainer.begin(ok)
    _expect(
        "INVALID_ARGUMENT",
        lambda: trainer.add_chunk(ActivationChunk("s", 0, 1, 0, True, frames[1])),
        "in order",
    )
    _expect(
        "RESOURCE_EXHAUSTED",
        lambda: trainer.add_chunk(ActivationChunk("s", 0, 0, 0, False, frames[0] + b"x" * 10)),
        "exceeds",
    )
    trainer.abort_step()
    trainer.begin(ok)
    _expect(
        "INVALID_ARGUMENT",
        lambda: trainer.add_chunk(ActivationChunk("s", 0, 0, 0, True, frames[0][:-3])),
        "tap 0",
    )
    trainer.abort_step()
    trainer.begin(ok)
    other = encode(torch.randn(1, 16), CodecConfig("fp16"))  # small enough to be read
    _expect(
        "INVALID_ARGUMENT",
        lambda: trainer.add_chunk(ActivationChunk("s", 0, 0, 0, True, other)),
        "codec",
    )
    trainer.abort_step()
    trainer.begin(ok)
    wrong_shape = encode(torch.randn(1, 64), CodecConfig("int8"))  # fits the byte budget
    _expect(
        "INVALID_ARGUMENT",
        lambda: trainer.add_chunk(ActivationChunk("s", 0, 0, 0, True, wrong_shape)),
        "shape",
    )
    trainer.abort_step()
    # after all that the session still trains normally
    assert _step(trainer, spec, 0, frames, torch.tensor([0, 1])).step == 0


def test_causal_lm_targets_checked(make_tiny_backbone):
    bb = make_tiny_backbone("qwen2")
    trainer, _ = _setup(bb, task="causal_lm")
    rows = torch.tensor([2], dtype=torch.int32)
    _expect(
        "INVALID_ARGUMENT",
        lambda: trainer.begin(
            StepBegin("s", 0, rows, torch.tensor([1]), None, torch.tensor([5, 99999]))
        ),
        "targets",
    )
    _expect(
        "INVALID_ARGUMENT",
        lambda: trainer.begin(
            StepBegin("s", 0, rows, torch.tensor([1]), None, torch.tensor([-100, -100]))
        ),
        "no loss",
    )
    trainer.begin(StepBegin("s", 0, rows, torch.tensor([1]), None, torch.tensor([5, -100])))
    frames = []
    bb.run(
        torch.tensor([[7, 8]]),
        torch.ones(1, 2, dtype=torch.long),
        lambda tap, h: frames.append(encode(h[0].float(), CodecConfig("int8"))),
    )
    ack = None
    for tap, f in enumerate(frames):
        ack = trainer.add_chunk(ActivationChunk("s", 0, tap, 0, True, f))
    assert ack is not None and ack.metrics["tokens"] == 1.0


def _private(bb):
    side = SideConfig(hidden_size=bb.hidden_size, num_taps=len(bb.taps), head_init="random")
    spec, head = build_session(
        bb, side, CodecConfig("int8"), TrainConfig(total_steps=40), private_labels=True
    )
    return Trainer(spec, FrozenHead(spec.head, head)), spec


def test_a_private_session_trains_on_gradients_and_refuses_labels(make_tiny_backbone):
    bb = make_tiny_backbone("llama")
    trainer, _ = _private(bb)
    frames = _frames(bb, torch.randint(3, 300, (4, 4)))
    layout = (torch.ones(4, dtype=torch.int32), torch.arange(4))
    with pytest.raises(RemoteError, match="carry no labels"):
        trainer.begin(StepBegin("s", 0, *layout, torch.tensor([0, 1, 0, 1])))

    def send(step):
        assert trainer.begin(StepBegin("s", step, *layout)) is None
        out = None
        for tap, f in enumerate(frames):
            out = trainer.add_chunk(ActivationChunk("s", step, tap, 0, True, f))
        return out

    feats = send(0)
    assert feats.data.shape == (4, bb.hidden_size)
    assert send(1) is None  # waits, decoded, for step 0's gradient
    with pytest.raises(RemoteError, match="gradient for step 1"):
        trainer.add_gradient(Gradient("s", 1, torch.zeros(4 * bb.hidden_size)))
    with pytest.raises(RemoteError, match="shape of its features"):
        trainer.add_gradient(Gradient("s", 0, torch.zeros(3)))
    # the session manager drops the steps in flight on a refusal; the device resends them
    trainer.abort_step()
    assert trainer.steps_done == 0 and send(0) is not None and send(1) is None
    before = {k: v.clone() for k, v in trainer.net.trainable_state().items()}
    ack, nxt = trainer.add_gradient(Gradient("s", 0, torch.randn(4 * bb.hidden_size), 0.5))
    assert ack.step == 0 and 0 < ack.metrics["clip"] <= 1 and nxt.step == 1
    assert math.isnan(ack.loss)  # the loss is the device's to know
    after = trainer.net.trainable_state()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    for step in range(2, 2 + 7):
        send(step)
    with pytest.raises(RemoteError, match="send it first"):
        trainer.begin(StepBegin("s", 9, *layout))
