"""Server and device as two OS processes over gRPC on loopback, on the real SmolLM2 weights."""

import json
import signal
import subprocess
import sys
import time

import pytest

from mobillm.data import DataConfig, load_examples, resolve_preset, tokenize_examples
from mobillm.device.local import LocalModel

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "mobillm.cli.main"]


def _wait_port(path, proc, seconds=120):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1]
        if path.is_file() and path.read_text().strip():
            return int(path.read_text())
        time.sleep(0.1)
    proc.kill()
    pytest.fail("the server did not start")


def test_train_over_grpc_then_infer_alone(tmp_path, smollm2):
    assert subprocess.run([*CLI, "serve", "--make-certs", str(tmp_path / "certs")]).returncode == 0
    certs = tmp_path / "certs"
    port_file, workdir, out = tmp_path / "port", tmp_path / "server", tmp_path / "side"
    keys, key_file = tmp_path / "keys", tmp_path / "device.key"
    added = subprocess.run(
        [*CLI, "serve", "--api-keys", str(keys), "--add-api-key", "phone-1"],
        capture_output=True, text=True,
    )  # fmt: skip
    key_file.write_text(json.loads(added.stdout)["key"])
    assert "phone-1" in keys.read_text() and key_file.read_text() not in keys.read_text()
    server = subprocess.Popen(
        [*CLI, "serve", "--port", "0", "--port-file", str(port_file), "--workdir", str(workdir),
         "--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server.key"),
         "--api-keys", str(keys)],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        port = _wait_port(port_file, server)
        device = subprocess.run(
            [*CLI, "train", "--server", f"127.0.0.1:{port}", "--tls-ca", str(certs / "ca.pem"),
             "--api-key-file", str(key_file), "--data", "sst2", "--max-train-samples", "96",
             "--batch-size", "16",
             # the server's checkpoint below is the whole model only when it holds the
             # classifier (with private labels, the default, the device keeps it)
             "--standard-labels",
             "--no-eval", "--out", str(out)],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert device.returncode == 0, device.stderr
    finally:
        server.send_signal(signal.SIGTERM)
        _, server_err = server.communicate(timeout=60)
    assert server.returncode == 0, server_err
    result = json.loads(device.stdout)
    # 96 samples: 10 streamed once as the validation split, 86 in 6 training steps
    train, server_summary = result["train"], result["server"]
    assert train["steps"] == 7 and train["validation_steps"] == 1 and server_summary["steps"] == 7
    # the default 3 epochs: 6 steps streamed, 12 more replayed from the server's cache
    assert server_summary["optimizer_steps"] == 18 and train["server_epochs"] == 3
    assert train["device_forward_passes_per_sample"] == 1.0
    assert "step 6/6" in device.stderr and "MB/s" in device.stderr
    assert "epoch 3 done" in device.stderr and "validation accuracy" in device.stderr
    # the server's own copy: the checkpoint it wrote when the session closed
    (ckpt,) = workdir.glob("sessions/*/step-000007")
    assert (ckpt / "side.safetensors").read_bytes() == (out / "side.safetensors").read_bytes()
    events = [json.loads(x) for x in (workdir / "server.jsonl").read_text().splitlines()]
    assert [e["loss"] for e in events if e["event"] == "step"][:1]  # per-step JSONL metrics
    assert [e["client"] for e in events if e["event"] == "open"] == ["key:phone-1"]
    # the server is gone: the device predicts alone, exactly as the server's copy does
    cfg = resolve_preset(DataConfig(preset="sst2", max_eval_samples=48))
    dev = tokenize_examples(load_examples(cfg, "eval"), smollm2.tokenizer, cfg)
    mine = LocalModel.load(smollm2, out).evaluate(dev, 24)
    theirs = LocalModel.load(smollm2, ckpt).evaluate(dev, 24)
    assert mine["predictions"] == theirs["predictions"]
    assert mine["accuracy"] == theirs["accuracy"] > 0.5
