"""``mobillm train --resume OUT`` after the device process is killed (SIGKILL) mid-run: the
side network ends bit for bit as the uninterrupted run's, against a `mobillm serve` process
and with the server in-process (where it died with the device and comes back from disk)."""

import json
import signal
import socket
import subprocess
import sys
import time

import pytest
from clidata import TASK_FLAGS, write_reviews

CLI = [sys.executable, "-m", "mobillm.cli.main"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(model_dir, data, out, *extra):
    return [
        *CLI, "train", "--model", model_dir, "--train-file", data, *TASK_FLAGS,
        "--batch-size", "4", "--window", "1", "--log-every", "1", "--dropout", "0.1",
        "--out", str(out), "--no-eval", *extra,
    ]  # fmt: skip


def _kill_after(cmd, step: int) -> None:
    """Run ``cmd`` and SIGKILL it once it reports training step ``step``."""
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        if f"step {step}/" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"


@pytest.mark.parametrize("where", ["server", "in-process"])
def test_killed_device_resumes_bit_exact(tmp_path, model_dir, where):
    data = write_reviews(tmp_path / "train.tsv", 40)
    extra: list[str] = ["--link-rtt-ms", "150"]  # slow enough to be killed mid-run
    server = None
    if where == "server":
        port = _free_port()
        server = subprocess.Popen(
            [*CLI, "serve", "--open", "--port", str(port), "--workdir", str(tmp_path / "srv")],
            stderr=subprocess.DEVNULL,
        )
        extra += ["--server", f"127.0.0.1:{port}"]
        deadline = time.monotonic() + 60
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            assert time.monotonic() < deadline and server.poll() is None
            time.sleep(0.1)
    try:
        ref = subprocess.run(_train(model_dir, data, tmp_path / "ref", *extra), capture_output=True)
        assert ref.returncode == 0, ref.stderr.decode()
        _kill_after(_train(model_dir, data, tmp_path / "run", *extra), step=8)
        assert (tmp_path / "run" / "session.json").is_file()
        done = subprocess.run(
            [*CLI, "train", "--resume", str(tmp_path / "run")], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            server.wait(60)
    assert "resuming session" in done.stderr and "reconnected" in done.stderr
    result = json.loads(done.stdout)
    assert result["train"]["reconnects"] == 1
    mine = (tmp_path / "run" / "side.safetensors").read_bytes()
    assert mine == (tmp_path / "ref" / "side.safetensors").read_bytes()
    assert not (tmp_path / "run" / "session.json").exists()  # closed: nothing to resume


def test_resumed_run_keeps_its_secret_frame_noise(tmp_path, model_dir, monkeypatch):
    """A run with frame noise and no --frame-noise-seed draws a secret seed; the resumed run
    reads it back from session.json and ends as an uninterrupted run with that seed. Its
    labels are randomized too, with the device's kept secret: the same draws again."""
    monkeypatch.setenv("MOBILLM_CACHE", str(tmp_path / "cache"))  # where the secret is kept
    data = write_reviews(tmp_path / "train.tsv", 40)
    extra = ["--link-rtt-ms", "150", "--frame-noise", "0.5", "--label-epsilon", "1"]
    _kill_after(_train(model_dir, data, tmp_path / "run", *extra), step=8)
    seed = json.loads((tmp_path / "run" / "session.json").read_text())["frame_noise_seed"]
    assert isinstance(seed, int) and seed >= 0
    ref = subprocess.run(
        _train(model_dir, data, tmp_path / "ref", *extra, "--frame-noise-seed", str(seed)),
        capture_output=True,
    )
    assert ref.returncode == 0, ref.stderr.decode()
    done = subprocess.run(
        [*CLI, "train", "--resume", str(tmp_path / "run")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["frame_noise_seed"] == -1  # the secret is not recorded
    mine = (tmp_path / "run" / "side.safetensors").read_bytes()
    assert mine == (tmp_path / "ref" / "side.safetensors").read_bytes()
