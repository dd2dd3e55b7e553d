"""Time and profile one batched training round of many sessions, alone (no devices, no threads).

What a GPU server's throughput is made of: ``Batcher._round`` over S same-shaped sessions of
B x T rows each, the taps already on the device, timed with a synchronize around it (min of
three after a warm-up), then one round under ``torch.profiler`` with its top kernels. Compare
with ``mobillm bench server --path trainer``, whose rounds also carry the sessions' host work.

    python scripts/profile_batched_round.py --device cuda --shape smollm2-135m --sessions 128
"""

from __future__ import annotations

import argparse
import time

import torch
from safetensors.torch import load
from torch.profiler import ProfilerActivity, profile

from mobillm.bench.serverload import SHAPES, LoadConfig, session_spec
from mobillm.server.batching import BatchConfig, Batcher, Ready
from mobillm.server.trainer import Trainer, use_tf32
from mobillm.side.head import FrozenHead


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    p.add_argument("--sessions", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--no-tf32", action="store_true")
    p.add_argument("--rows", type=int, default=22, help="kernels listed")
    args = p.parse_args()
    dev, s = args.device, args.sessions
    cuda = dev.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    use_tf32(dev, not args.no_tf32)
    cfg = LoadConfig(shape=args.shape, sessions=s, batch=args.batch, seq=args.seq, max_batch=s)
    batcher = Batcher(BatchConfig(max_batch=s, wait_ms=1000.0, round_bytes=0))
    spec0, blob = session_spec(cfg, 0)
    head = FrozenHead(spec0.head, load(blob)).to(dev)
    trainers = [Trainer(session_spec(cfg, i)[0], head, dev, batcher=batcher) for i in range(s)]
    rows = args.batch * args.seq
    hidden = [torch.randn(rows, spec0.side.hidden_size, device=dev) for _ in spec0.taps]
    layout = (
        torch.full((args.batch,), args.seq, dtype=torch.int32),
        torch.arange(args.batch) * args.seq + args.seq - 1,
    )
    labels = torch.randint(0, 2, (args.batch,))

    def items() -> list[Ready]:
        return [Ready(t, hidden, labels, layout, t.net.draw_dropout(rows, None)) for t in trainers]

    key = trainers[0].batch_key
    batcher._round(key, items())  # warm-up
    times = []
    for _ in range(3):
        batch = items()
        sync()
        t0 = time.perf_counter()
        batcher._round(key, batch)
        sync()
        times.append(time.perf_counter() - t0)
    best = min(times)
    peak = f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if cuda else ""
    print(f"{args.shape} S={s} B{args.batch}xT{args.seq} on {dev}: round {1000 * best:.1f} ms, "
          f"{s / best:.0f} session-steps/s for the round alone{peak}")  # fmt: skip
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    batch = items()
    with profile(activities=activities) as prof:
        batcher._round(key, batch)
        sync()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=args.rows))
    batcher.close()


if __name__ == "__main__":
    main()
