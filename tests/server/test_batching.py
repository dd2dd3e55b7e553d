"""Sessions trained together in stacked rounds end exactly where they end trained alone."""

import threading

import pytest
import torch

from mobillm.codec import CodecConfig, encode
from mobillm.device.runtime import build_session
from mobillm.server.batching import BatchConfig, Batcher, Ready
from mobillm.server.trainer import Trainer
from mobillm.side.config import SideConfig
from mobillm.side.head import FrozenHead
from mobillm.transport.messages import (
    Gradient,
    RemoteError,
    StepBegin,
    TrainConfig,
    chunk_frame,
)

TOL = dict(rtol=1e-4, atol=1e-5)
# Rounds that must be shared wait this long for their sessions' steps: they close as soon as
# every active session's step is in, so it costs nothing unless a thread stalls (a busy CI box)
WAIT_MS = 1000  # the most BatchConfig allows


def _spec(bb, task, seed, lr, pooling="last", dropout=0.1, private=False):
    side = SideConfig(
        hidden_size=bb.hidden_size,
        num_taps=len(bb.taps),
        task=task,
        head_init="random",
        dropout=dropout,
        pooling=pooling,
    )
    train = TrainConfig(lr=lr, total_steps=12, seed=seed, label_smoothing=0.0)
    positions = "valid" if pooling == "mean" else "loss"
    return build_session(bb, side, CodecConfig("int8"), train, positions, private)


def _trainers(bb, task, batcher, pooling="last", private=False):
    out = []
    head = None
    for seed, lr in ((0, 1e-2), (1, 3e-3), (2, 2e-2)):
        spec, tensors = _spec(bb, task, seed, lr, pooling, private=private)
        head = head or FrozenHead(spec.head, tensors)  # one shared head, as the server's cache
        out.append(Trainer(spec, head, batcher=batcher))
    return out


def _data(bb, task, n_steps, all_rows=False):
    """Per session and step: (begin, frames); sessions differ in batch size and rows."""
    g = torch.Generator().manual_seed(3)
    plan = []
    for sess, b in enumerate((8, 5, 3)):
        steps = []
        for s in range(n_steps):
            ids = torch.randint(3, 300, (b, 4), generator=g)
            frames: list[bytes] = []
            if task == "classification" and not all_rows:
                bb.run(
                    ids,
                    torch.ones_like(ids),
                    lambda t, h, f=frames: f.append(
                        encode(h[:, -1, :].float(), CodecConfig("int8"))
                    ),
                )
                begin = StepBegin(
                    f"s{sess}",
                    s,
                    torch.ones(b, dtype=torch.int32),
                    torch.arange(b),
                    (ids[:, -1] % 2).long(),
                )
            else:
                bb.run(
                    ids,
                    torch.ones_like(ids),
                    lambda t, h, f=frames: f.append(
                        encode(h.reshape(-1, h.shape[-1]).float(), CodecConfig("int8"))
                    ),
                )
                targets = torch.roll(ids, -1, 1).reshape(-1).clone()
                targets[::4] = -100
                labels = (ids[:, -1] % 2).long() if task == "classification" else None
                begin = StepBegin(
                    f"s{sess}",
                    s,
                    torch.full((b,), 4, dtype=torch.int32),
                    torch.arange(b) * 4 + 3,
                    labels,
                    None if labels is not None else targets,
                )
            steps.append((begin, frames))
        plan.append(steps)
    return plan


def _step(trainer, begin, frames):
    trainer.begin(begin)
    ack = None
    for tap, f in enumerate(frames):
        for c in chunk_frame(begin.session_id, begin.step, tap, f, 1 << 20):
            ack = trainer.add_chunk(c)
    return ack


def _at_once(sessions, n_steps, step):
    """``step(i, s)`` for each step ``s`` of every session ``i`` at once, from its own thread,
    as the server's pool does; the results by session and step."""
    out = [[None] * n_steps for _ in range(sessions)]

    def go(i, s):
        out[i][s] = step(i, s)

    for s in range(n_steps):
        threads = [threading.Thread(target=go, args=(i, s)) for i in range(sessions)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    return out


def _run_together(trainers, plan, n_steps):
    return _at_once(len(trainers), n_steps, lambda i, s: _step(trainers[i], *plan[i][s]))


@pytest.mark.parametrize(
    "arch,task,pooling,taps",
    [
        ("llama", "classification", "last", "all"),
        ("llama", "classification", "mean", "all"),
        ("qwen2", "causal_lm", "last", "all"),
        ("llama", "classification", "last", "2"),  # one tap: the ladder's gate goes unused
    ],
)
def test_batched_sessions_match_alone(make_tiny_backbone, arch, task, pooling, taps):
    bb = make_tiny_backbone(arch, taps=taps)
    n = 6
    plan = _data(bb, task, n, all_rows=pooling == "mean")
    alone = _trainers(bb, task, None, pooling)
    ref = [[_step(t, *plan[i][s]) for s in range(n)] for i, t in enumerate(alone)]
    batcher = Batcher(BatchConfig(max_batch=8, wait_ms=WAIT_MS))
    try:
        together = _trainers(bb, task, batcher, pooling)
        assert all(t.batcher is batcher for t in together)
        got = _run_together(together, plan, n)
    finally:
        batcher.close()
    assert max(a.metrics["batch"] for row in got for a in row) == 3  # they did share rounds
    if pooling == "mean":  # rounds of clipped (grad_clip 1) and unclipped sessions together
        norms = [a.metrics["grad_norm"] for row in got for a in row]
        assert min(norms) < 1.0 < max(norms)
    for i in range(3):
        assert [a.loss for a in got[i]] == pytest.approx(
            [a.loss for a in ref[i]], rel=1e-4, abs=1e-5
        )
        want, have = alone[i].state(), together[i].state()
        for k, v in want[0].items():
            torch.testing.assert_close(have[0][k], v, **TOL, msg=k)
        assert have[1]["optimizer_steps"] == want[1]["optimizer_steps"] == n
        assert have[1]["scheduler"] == want[1]["scheduler"]


def _private_step(trainer, begin, frames, scale):
    """A private-label step as its device drives it: the step's frames (no labels), then a
    gradient for the features the server sent back (drawn from the step, ``scale`` times)."""
    sid, step = begin.session_id, begin.step
    if begin.labels is not None:
        begin = StepBegin(sid, step, begin.rows_per_sample, begin.pool_rows)
    else:
        mask = begin.targets != -100
        begin = StepBegin(sid, step, begin.rows_per_sample, begin.pool_rows, loss_mask=mask)
    assert trainer.begin(begin) is None
    feats = None
    for tap, f in enumerate(frames):
        for c in chunk_frame(sid, step, tap, f, 1 << 20):
            feats = feats or trainer.add_chunk(c)
    g = torch.Generator().manual_seed(100 * int(sid[1:]) + step)
    grad = scale * torch.randn(feats.data.shape, generator=g)
    (ack,) = trainer.add_gradient(Gradient(sid, step, grad.reshape(-1), 0.04 * scale**2))
    return feats.data, ack


@pytest.mark.parametrize("task", ["classification", "causal_lm"])
def test_private_label_sessions_batched_match_alone(make_tiny_backbone, task):
    """Private-label steps train in rounds once their devices' gradients are in: the features
    sent, the clipping factors and the weights as trained alone; rounds mix clipped and
    unclipped sessions."""
    bb = make_tiny_backbone("llama" if task == "classification" else "qwen2")
    n = 4
    plan = _data(bb, task, n)
    scales = (0.05, 1.0, 20.0)  # session 0 under grad_clip (1.0), 2 far over it

    def run(trainers, i, s):
        return _private_step(trainers[i], *plan[i][s], scales[i])

    alone = _trainers(bb, task, None, private=True)
    ref = [[run(alone, i, s) for s in range(n)] for i in range(3)]
    batcher = Batcher(BatchConfig(max_batch=8, wait_ms=WAIT_MS))
    try:
        together = _trainers(bb, task, batcher, private=True)
        assert all(t.batcher is batcher for t in together)
        got = _at_once(3, n, lambda i, s: run(together, i, s))
    finally:
        batcher.close()
    acks = [a for row in got for _, a in row]
    assert max(a.metrics["batch"] for a in acks) == 3  # they did share rounds
    clips = [a.metrics["clip"] for a in acks]
    assert min(clips) < 1.0 == max(clips)
    for i in range(3):
        for (f_got, a_got), (f_ref, a_ref) in zip(got[i], ref[i], strict=True):
            torch.testing.assert_close(f_got, f_ref, **TOL)
            assert a_got.metrics["clip"] == pytest.approx(a_ref.metrics["clip"], rel=1e-4)
        want, have = alone[i].state(), together[i].state()
        for k, v in want[0].items():
            torch.testing.assert_close(have[0][k], v, **TOL, msg=k)
        assert have[1]["optimizer_steps"] == want[1]["optimizer_steps"] == n


def test_batched_checkpoint_resumes_and_trains_alone_after(make_tiny_backbone):
    """A batched session's checkpoint loads into a fresh trainer (batched or not) and goes on
    exactly as the original would; the optimizer moments stay shared with the flat vectors."""
    bb = make_tiny_backbone("llama")
    plan = _data(bb, "classification", 6)
    batcher = Batcher(BatchConfig(max_batch=4, wait_ms=0))
    try:
        first = _trainers(bb, "classification", batcher)[0]
        for s in range(3):
            _step(first, *plan[0][s])
        saved = first.state()
        again = _trainers(bb, "classification", batcher)[0]
        again.load_state(*saved)
        plain = _trainers(bb, "classification", None)[0]
        plain.load_state(*saved)
        for s in range(3, 6):
            a = _step(first, *plan[0][s])
            b = _step(again, *plan[0][s])
            c = _step(plain, *plan[0][s])
            assert a.loss == pytest.approx(b.loss, rel=1e-4) and a.loss == pytest.approx(
                c.loss, rel=1e-4
            )
    finally:
        batcher.close()
    for k, v in first.state()[0].items():
        torch.testing.assert_close(again.state()[0][k], v, **TOL, msg=k)
        torch.testing.assert_close(plain.state()[0][k], v, **TOL, msg=k)


def test_a_poisoned_step_fails_only_its_session(make_tiny_backbone):
    bb = make_tiny_backbone("llama")
    plan = _data(bb, "classification", 1)
    batcher = Batcher(BatchConfig(max_batch=8, wait_ms=WAIT_MS))
    try:
        good, bad, idle = _trainers(bb, "classification", batcher)
        batcher.detach(idle)  # no round waits for a session that sends nothing
        before = {k: v.clone() for k, v in bad.net.trainable_state().items()}
        hidden = [torch.full((5, bb.hidden_size), float("inf"))] * len(bb.taps)
        masks = bad.net.draw_dropout(5, None)
        layout = (torch.ones(5, dtype=torch.int32), torch.arange(5))  # 5 samples of one row
        poisoned = Ready(bad, hidden, torch.zeros(5, dtype=torch.long), layout, masks)
        errors = []

        def poison():
            try:
                batcher.train(poisoned)
            except RemoteError as e:
                errors.append(e)

        t = threading.Thread(target=poison)
        t.start()
        ack = _step(good, *plan[0][0])
        t.join()
    finally:
        batcher.close()
    assert ack.step == 0 and ack.metrics["batch"] == 2 and ack.loss == ack.loss  # shared, finite
    assert [e.code for e in errors] == ["INVALID_ARGUMENT"]
    for k, v in bad.net.trainable_state().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_model_shaped_sessions_match_alone(device):
    """SmolLM2-shaped side networks (30 taps, width 72, dropout on), different seeds and
    learning rates, mean-pooled steps of different lengths: batched on ``device`` as alone."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device here")
    from safetensors.torch import load

    from mobillm.bench.serverload import LoadConfig, session_spec

    cfg = LoadConfig(shape="smollm2-135m", batch=2, seq=3, steps=4, warmup=0)
    spec0, blob = session_spec(cfg, 0)
    head = FrozenHead(spec0.head, load(blob)).to(device)
    g = torch.Generator().manual_seed(0)
    d = spec0.side.hidden_size

    def plan(i, s):
        b = 2 + (i + s) % 3  # samples per step differ across sessions and steps
        rows = torch.full((b,), 3, dtype=torch.int32)
        labels = torch.randint(0, 2, (b,), generator=g)
        hidden = [torch.randn(3 * b, d, generator=g).to(device) for _ in spec0.taps]
        return StepBegin(f"s{i}", s, rows, torch.arange(b) * 3 + 2, labels), hidden

    steps = [[plan(i, s) for s in range(4)] for i in range(3)]

    def make(batcher):
        return [Trainer(session_spec(cfg, i)[0], head, device, batcher=batcher) for i in range(3)]

    def run(t, begin, hidden):
        t.begin(begin)
        return [t.add_hidden(h) for h in hidden][-1]

    alone = make(None)
    ref = [[run(t, *steps[i][s]) for s in range(4)] for i, t in enumerate(alone)]
    batcher = Batcher(BatchConfig(max_batch=8, wait_ms=WAIT_MS))
    try:
        together = make(batcher)
        got = _at_once(3, 4, lambda i, s: run(together[i], *steps[i][s]))
    finally:
        batcher.close()
    assert max(a.metrics["batch"] for row in got for a in row) == 3
    for i in range(3):
        assert [a.loss for a in got[i]] == pytest.approx([a.loss for a in ref[i]], rel=1e-4)
        want, have = alone[i].state()[0], together[i].state()[0]
        for k, v in want.items():
            # Adam divides by the gradient's own scale: a reassociated sum in a near-zero
            # gradient moves a weight by up to ~lr * 1e-2; 1e-4 is far below one step (lr)
            torch.testing.assert_close(have[k], v, rtol=1e-4, atol=1e-4, msg=k)


def test_rounds_stay_within_their_memory_bound(make_tiny_backbone):
    """A round takes only as many steps as its byte bound allows (always at least one)."""
    bb = make_tiny_backbone("llama")
    plan = _data(bb, "classification", 2)
    batcher = Batcher(BatchConfig(max_batch=8, wait_ms=300, round_bytes=1))
    try:
        trainers = _trainers(bb, "classification", batcher)
        got = _run_together(trainers, plan, 2)
    finally:
        batcher.close()
    assert {a.metrics["batch"] for row in got for a in row} == {1.0}


def test_an_idle_batcher_gives_its_round_buffers_back(make_tiny_backbone, monkeypatch):
    """A CPU batcher keeps a round's stacked weights and gradients for the next round, and
    frees them once no step came for IDLE_S."""
    import time

    from mobillm.server import batching

    monkeypatch.setattr(batching, "IDLE_S", 0.5)
    bb = make_tiny_backbone("llama")
    plan = _data(bb, "classification", 1)
    batcher = Batcher(BatchConfig(max_batch=8, wait_ms=300))
    try:
        trainers = _trainers(bb, "classification", batcher)
        _run_together(trainers, plan, 1)
        held = dict(batcher._buffers)
        one = trainers[0].flat.p.numel()  # sessions of one shape, one to three a round
        assert sorted(held) == ["grads", "weights"]
        assert one <= held["weights"].numel() <= 3 * one
        time.sleep(1.5)
        assert not batcher._buffers
    finally:
        batcher.close()


@pytest.mark.parametrize("batched", [False, True])
def test_an_aborted_step_gives_back_its_dropout_draws(make_tiny_backbone, batched):
    """A step dropped halfway (a cut link) and sent again trains as if never dropped."""
    bb = make_tiny_backbone("llama")
    plan = _data(bb, "classification", 3)
    batcher = Batcher(BatchConfig(max_batch=4, wait_ms=0)) if batched else None
    try:
        ref = _trainers(bb, "classification", batcher)[0]
        want = [_step(ref, *plan[0][s]).loss for s in range(3)]
        cut = _trainers(bb, "classification", batcher)[0]
        got = [_step(cut, *plan[0][0]).loss]
        begin, frames = plan[0][1]
        cut.begin(begin)
        cut.add_chunk(next(iter(chunk_frame(begin.session_id, 1, 0, frames[0], 1 << 20))))
        cut.abort_step()
        got += [_step(cut, *plan[0][s]).loss for s in (1, 2)]
    finally:
        if batcher is not None:
            batcher.close()
    assert got == want
