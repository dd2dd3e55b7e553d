"""A device trains a tiny backbone's side network over real gRPC on loopback: plain, TLS, mTLS."""

import json
import time

import pytest

from mobillm.errors import ConfigError
from mobillm.server.grpc_server import GrpcServer
from mobillm.transport.grpc_client import GrpcTransport, TlsClientConfig
from mobillm.transport.messages import RemoteError
from mobillm.transport.tls import TlsServerConfig, is_loopback, make_certs


def _tls(mode, certs):
    if mode == "insecure":
        return None, None
    server = TlsServerConfig(certs["cert"], certs["key"], certs["ca"] if mode == "mtls" else "")
    if mode == "tls":
        return server, TlsClientConfig(ca=certs["ca"])
    return server, TlsClientConfig(certs["ca"], certs["client_cert"], certs["client_key"])


def _events(server):
    path = f"{server.cfg.workdir}/server.jsonl"
    return [json.loads(line) for line in open(path)]


@pytest.mark.parametrize("mode", ["insecure", "tls", "mtls"])
def test_device_trains_over_grpc(
    tmp_path, mode, certs, make_tiny_backbone, cls_data, start_server, device_trainer
):
    server_tls, client_tls = _tls(mode, certs)
    server = start_server(tls=server_tls)
    assert server.mode == {"insecure": "insecure", "tls": "tls", "mtls": "mutual tls"}[mode]
    bb = make_tiny_backbone("llama")
    data, _ = cls_data(bb.tokenizer)
    transport = GrpcTransport(f"127.0.0.1:{server.port}", tls=client_tls)
    tr = device_trainer(bb, transport, epochs=3, replay=False)  # every step on the stream
    summary = tr.train(data, 16)
    losses = [r.loss for r in tr.records]
    assert summary["steps"] == 12 and [r.step for r in tr.records] == list(range(12))
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    assert summary["bytes_sent"] > summary["bytes_encoded"] > 0
    out = tr.download(tmp_path / "side", {})
    blob = server.manager.download(tr.info.session_id, tr.info.token)
    assert (out / "side.safetensors").read_bytes() == blob.weights
    closed = transport.close()
    assert closed["steps"] == 12 and closed["samples"] == 192
    assert closed["bytes_received"] == summary["bytes_encoded"]
    assert closed["checkpoint"].endswith("step-000012")

    events = _events(server)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "serving" and events[0]["mode"] == server.mode
    (opened,) = [e for e in events if e["event"] == "open"]
    assert opened["client"] == ("cert:" if mode == "mtls" else "anonymous") + (
        "mobillm-device" if mode == "mtls" else ""
    )
    assert kinds.count("step") == 12 and {"open", "head", "download", "close"} <= set(kinds)
    step = next(e for e in events if e["event"] == "step")
    assert {"session", "step", "loss", "bytes", "lr", "accuracy"} <= set(step)
    sid = tr.info.session_id
    metrics = (tmp_path / "server0" / "sessions" / sid / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(m)["step"] for m in metrics] == list(range(12))


def test_same_run_twice_gives_identical_weights(
    tmp_path, make_tiny_backbone, cls_data, start_server, device_trainer
):
    """A gRPC run alone on its server is deterministic (the resume tests compare bit for bit)."""
    server = start_server()
    bb = make_tiny_backbone("llama")
    data, _ = cls_data(bb.tokenizer, n=32)
    weights = []
    for _ in range(2):
        tr = device_trainer(bb, GrpcTransport(f"127.0.0.1:{server.port}"), epochs=2)
        tr.train(data, 8)
        weights.append(tr.transport.download().weights)
        tr.transport.close()
    assert weights[0] == weights[1]


def _refused(transport, spec, needle):
    t0 = time.perf_counter()
    with pytest.raises(RemoteError) as e:
        transport.open(spec)
    transport.shutdown()
    assert e.value.code == "UNAVAILABLE", e.value
    assert "cannot reach server at 127.0.0.1" in e.value.message
    assert needle.lower() in e.value.message.lower(), e.value.message
    assert time.perf_counter() - t0 < 5
    return e.value


def test_tls_refusals_are_clear(tmp_path, certs, make_tiny_backbone, session_spec, start_server):
    spec, _ = session_spec(make_tiny_backbone("llama"))
    tls_server = start_server(tls=TlsServerConfig(certs["cert"], certs["key"]))
    target = f"127.0.0.1:{tls_server.port}"
    # a plaintext client against a TLS server
    _refused(GrpcTransport(target), spec, "")
    # a client that trusts another CA
    other = make_certs(tmp_path / "other")
    _refused(GrpcTransport(target, tls=TlsClientConfig(ca=other["ca"])), spec, "ssl")
    # mutual TLS: a client without a certificate, or with one from another CA
    mtls = start_server(tls=TlsServerConfig(certs["cert"], certs["key"], certs["ca"]))
    target = f"127.0.0.1:{mtls.port}"
    _refused(GrpcTransport(target, tls=TlsClientConfig(ca=certs["ca"])), spec, "")
    stranger = TlsClientConfig(certs["ca"], other["client_cert"], other["client_key"])
    _refused(GrpcTransport(target, tls=stranger), spec, "")
    # and the right certificate works
    mine = TlsClientConfig(certs["ca"], certs["client_cert"], certs["client_key"])
    ok = GrpcTransport(target, tls=mine)
    assert ok.open(spec).session_id
    ok.shutdown()


def test_unreachable_server_fails_fast(make_tiny_backbone, session_spec, start_server):
    spec, _ = session_spec(make_tiny_backbone("llama"))
    server = start_server()
    port = server.port
    server.stop(grace=0)
    _refused(GrpcTransport(f"127.0.0.1:{port}", connect_timeout=3), spec, "")


def test_tls_configs_validate(tmp_path, certs):
    with pytest.raises(ConfigError, match="both"):
        TlsClientConfig(ca=certs["ca"], cert=certs["client_cert"])
    with pytest.raises(ConfigError, match="file not found"):
        TlsClientConfig(ca=str(tmp_path / "nope.pem"))
    with pytest.raises(ConfigError, match="both"):
        TlsServerConfig(certs["cert"], "")
    with pytest.raises(ConfigError, match="client_ca: file not found"):
        TlsServerConfig(certs["cert"], certs["key"], str(tmp_path / "ca.pem"))
    assert not TlsClientConfig().enabled and TlsClientConfig(ca=certs["ca"]).enabled


def test_plaintext_only_on_loopback(tmp_path):
    from mobillm.server.auth import add_key
    from mobillm.server.sessions import ServerConfig

    with pytest.raises(ConfigError, match=r"refusing to serve without TLS on 0\.0\.0\.0"):
        GrpcServer(host="0.0.0.0")
    add_key(tmp_path / "keys", "me")
    keyed = ServerConfig(workdir=str(tmp_path), api_keys_file=str(tmp_path / "keys"))
    GrpcServer(keyed, host="0.0.0.0", insecure=True)  # explicit: allowed
    # the device side: plaintext only to loopback unless told
    with pytest.raises(ConfigError, match=r"refusing plaintext to 10\.0\.0\.1"):
        GrpcTransport("10.0.0.1:50051")
    GrpcTransport("10.0.0.1:50051", insecure=True).shutdown()
    assert all(map(is_loopback, ["localhost", "127.0.0.1", "127.1.2.3", "::1", "[::1]"]))
    assert not any(map(is_loopback, ["0.0.0.0", "10.0.0.1", "example.org", "::"]))


def test_busy_port_is_refused(start_server):
    from mobillm.server.grpc_server import ServeError

    server = start_server()
    with pytest.raises(ServeError, match=f"cannot listen on 127.0.0.1:{server.port}"):
        start_server(port=server.port)


def test_cache_epochs_and_validation_over_grpc(
    tmp_path, make_tiny_backbone, cls_data, start_server, device_trainer
):
    """Finish streams one report per replayed epoch; the result equals the in-process run."""
    from mobillm.server.inprocess import InProcessTransport
    from mobillm.server.sessions import ServerConfig, SessionManager

    server = start_server()
    bb = make_tiny_backbone("llama")
    data, _ = cls_data(bb.tokenizer, n=48)
    val, _ = cls_data(bb.tokenizer, n=16, seed=1)
    runs = []
    for transport in (
        GrpcTransport(f"127.0.0.1:{server.port}"),
        InProcessTransport(SessionManager(ServerConfig(workdir=str(tmp_path / "inproc")))),
    ):
        tr = device_trainer(bb, transport, epochs=3)
        summary = tr.train(data, 16, validation=val)
        runs.append((summary, transport.download().weights))
        closed = transport.close()
        assert closed["server_epochs"] == 3 and closed["optimizer_steps"] == 9
    (s_grpc, w_grpc), (s_local, w_local) = runs
    assert w_grpc == w_local
    assert [e["epoch"] for e in s_grpc["epochs"]] == [1, 2, 3]
    for key in ("train_loss", "val_accuracy", "val_loss"):
        assert [e[key] for e in s_grpc["epochs"]] == [e[key] for e in s_local["epochs"]]
    assert s_grpc["device_forward_passes_per_sample"] == 1.0
    kinds = [e["event"] for e in _events(server)]
    assert kinds.count("epoch") == 3
    # the cache is gone with the session
    assert not list((tmp_path / "server0" / "sessions").rglob("step-*.safetensors"))
