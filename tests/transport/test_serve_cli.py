"""``mobillm serve`` as a separate process: ready line, port file, a session, graceful stop."""

import json
import signal
import subprocess
import sys
import time

import pytest

from mobillm.cli.main import main
from mobillm.transport.grpc_client import GrpcTransport, TlsClientConfig


def _wait_for(path, proc, seconds=60):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited early: {proc.communicate()[1]}")
        if path.is_file() and path.read_text().strip():
            return int(path.read_text())
        time.sleep(0.05)
    proc.kill()
    pytest.fail("server did not write its port file")


def test_serve_process_with_tls(tmp_path, make_tiny_backbone, session_spec):
    certs = tmp_path / "certs"
    assert main(["serve", "--make-certs", str(certs), "--cert-host", "my.host"]) == 0
    port_file, workdir = tmp_path / "port", tmp_path / "server"
    cmd = [
        sys.executable, "-m", "mobillm.cli.main", "serve", "--port", "0",
        "--port-file", str(port_file), "--workdir", str(workdir),
        "--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server.key"),
        "--max-chunk-bytes", "65536", "--open",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        spec, head = session_spec(make_tiny_backbone("llama"))  # while the server starts
        port = _wait_for(port_file, proc)
        t = GrpcTransport(f"127.0.0.1:{port}", tls=TlsClientConfig(ca=str(certs / "ca.pem")))
        info = t.open(spec)
        assert info.need_head and info.max_chunk_bytes == 65536 and info.server == "mobillm"
        t.upload_head(head)
        closed = t.close()
        assert closed == {"steps": 0, "samples": 0, "bytes_received": 0} | {
            "optimizer_steps": 0,
            "server_epochs": 0,
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"serving on 127.0.0.1:{port} (tls)" in err
    events = [json.loads(x)["event"] for x in (workdir / "server.jsonl").read_text().splitlines()]
    assert events == ["serving", "open", "head", "close", "stop"]


def test_serve_refuses_bad_setups(tmp_path, capsys):
    def refused(*argv):
        assert main(["serve", "--workdir", str(tmp_path), *argv]) == 2
        return capsys.readouterr().err

    assert "refusing to serve without TLS on 0.0.0.0" in refused("--host", "0.0.0.0")
    assert "file not found" in refused("--tls-cert", "nope.pem", "--tls-key", "nope.key")
    assert "both --tls-cert and --tls-key" in refused("--tls-cert", "x.pem")
    assert "sha256" in refused("--allow-backbone", "llama")
    assert "max_chunk_bytes" in refused("--max-chunk-bytes", "10", "--open")
    assert "say who may open sessions" in refused()
    assert "loopback only" in refused("--host", "0.0.0.0", "--insecure", "--open")
    assert "API key file not found" in refused("--api-keys", str(tmp_path / "none"))
    assert "needs --api-keys" in refused("--add-api-key", "me")
