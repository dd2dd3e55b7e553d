"""Eight real device processes train at once against one batched `mobillm serve` process, and
each ends with the side network it gets from a server that trains every session on its own."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from mobillm.bench.serverproc import start_server
from mobillm.bench.tinymodel import TASK_FLAGS, write_task, write_tiny_model

DEVICES = 8
pytestmark = pytest.mark.slow


def _train_all(model, data, port, work, tag):
    procs = []
    for i in range(DEVICES):
        out = work / f"{tag}-{i}"
        cmd = [
            sys.executable, "-m", "mobillm.cli.main", "train", "--model", str(model),
            "--train-file", str(data), *TASK_FLAGS, "--learner", "ladder",  # stackable:
            "--standard-labels",  # a round cannot wait on a device's gradient
            "--batch-size", "8", "--dropout", "0.1",
            "--seed", str(i), "--lr", str(2e-3 * (1 + i % 3)), "--no-eval", "--threads", "1",
            "--server", f"127.0.0.1:{port}", "--out", str(out),
        ]  # fmt: skip
        procs.append((out, subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.PIPE, text=True)))  # fmt: skip
    outs = []
    for out, proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
        outs.append(load_file(str(out / "side.safetensors")))
    return outs


def test_eight_device_processes_batched_match_alone(tmp_path):
    model = write_tiny_model(tmp_path / "tiny")
    data = write_task(tmp_path / "task.tsv", 96, seed=0)
    alone_srv, alone_port = start_server(tmp_path / "alone", "--max-batch", "1")
    batch_srv, batch_port = start_server(
        tmp_path / "batched", "--max-batch", str(DEVICES), "--batch-wait-ms", "500"
    )
    try:
        alone = _train_all(model, data, alone_port, tmp_path, "alone")
        batched = _train_all(model, data, batch_port, tmp_path, "batched")
    finally:
        for srv in (alone_srv, batch_srv):
            srv.terminate()
            srv.wait(timeout=60)
    events = [json.loads(x) for x in (tmp_path / "batched" / "server.jsonl").open()]
    sizes = [e.get("batch", 1) for e in events if e["event"] == "step"]
    assert max(sizes) > 1, "the devices never shared a round"
    assert all(e.get("batch", 1) == 1 for e in
               (json.loads(x) for x in (tmp_path / "alone" / "server.jsonl").open())
               if e["event"] == "step")  # fmt: skip
    for i, (want, got) in enumerate(zip(alone, batched, strict=True)):
        assert want.keys() == got.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-4, msg=f"{i}: {k}")
    # and the sessions did differ: seeds and learning rates give different networks
    assert not torch.equal(alone[0]["up.weight"], alone[1]["up.weight"])
