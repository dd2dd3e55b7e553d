"""Devices training at once against a batching server over gRPC: same weights as alone, and
the server's Prometheus metrics, scraped over HTTP."""

import threading
import urllib.request

import torch
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load

from mobillm.transport.grpc_client import GrpcTransport

DEVICES = 3


def _train(server, bb, data, device_trainer, seed, private=False):
    transport = GrpcTransport(f"127.0.0.1:{server.port}")
    tr = device_trainer(bb, transport, epochs=1, lr=5e-3, seed=seed, private=private)
    tr.train(data, 16)
    blob = server.manager.download(tr.info.session_id, tr.info.token)
    return tr, transport, blob


def _scrape(port):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_batched_devices_end_as_alone_and_metrics_count_them(
    make_tiny_backbone, cls_data, start_server, device_trainer
):
    # one backbone per device: a backbone's layer hooks serve one forward pass at a time
    bbs = [make_tiny_backbone("llama") for _ in range(DEVICES)]
    data, _ = cls_data(bbs[0].tokenizer, n=96)
    alone_server = start_server(max_batch=1)  # each session trained on its own
    alone = [_train(alone_server, bbs[0], data, device_trainer, s)[2] for s in range(DEVICES)]

    server = start_server(max_batch=8, batch_wait_ms=1000, metrics_port=0)
    results = [None] * DEVICES

    def run(i):
        results[i] = _train(server, bbs[i], data, device_trainer, i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(DEVICES)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (_, _, blob), want in zip(results, alone, strict=True):
        got, ref = load(blob.weights), load(want.weights)
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5, msg=k)
    batches = [r.metrics.get("batch", 1) for tr, _, _ in results for r in tr.records]
    assert max(batches) > 1, "the devices never shared a round"

    m = _scrape(server.metrics_port)
    steps = sum(len(tr.records) for tr, _, _ in results)
    assert m[("mobillm_steps_total", ())] == steps
    assert m[("mobillm_ack_latency_seconds_count", ())] == steps
    assert m[("mobillm_sessions_open", ())] == DEVICES
    assert m[("mobillm_batch_queue_depth", ())] == 0
    assert m[("mobillm_received_bytes_total", ())] > 0
    assert m[("mobillm_steps_per_second", ())] > 0
    sid = results[0][0].info.session_id
    assert m[("mobillm_session_steps_total", (("session", sid),))] == len(results[0][0].records)
    results[0][1].close()
    m = _scrape(server.metrics_port)
    assert ("mobillm_session_steps_total", (("session", sid),)) not in m
    assert m[("mobillm_steps_total", ())] == steps


def test_private_label_devices_share_rounds_and_end_as_alone(
    make_tiny_backbone, cls_data, start_server, device_trainer
):
    """Devices keeping their labels (the default) train in a batching server's rounds too:
    each round runs once its devices' gradients are in, and every device ends, on both
    halves of its model, where it ends trained alone."""
    bbs = [make_tiny_backbone("llama") for _ in range(DEVICES)]
    data, _ = cls_data(bbs[0].tokenizer, n=96)
    alone_server = start_server(max_batch=1)
    alone = [
        _train(alone_server, bbs[0], data, device_trainer, s, private=True) for s in range(DEVICES)
    ]
    server = start_server(max_batch=8, batch_wait_ms=1000)
    results = [None] * DEVICES

    def run(i):
        results[i] = _train(server, bbs[i], data, device_trainer, i, private=True)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(DEVICES)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r is not None for r in results)
    for (tr, _, blob), (ref, _, want) in zip(results, alone, strict=True):
        got, exp = load(blob.weights), load(want.weights)
        assert got.keys() == exp.keys() and not any(k.startswith("classifier") for k in got)
        for k in exp:
            torch.testing.assert_close(got[k], exp[k], rtol=1e-4, atol=1e-5, msg=k)
        mine, theirs = tr.labels.classifier.state_dict(), ref.labels.classifier.state_dict()
        for k in theirs:
            torch.testing.assert_close(mine[k], theirs[k], rtol=1e-4, atol=1e-5, msg=k)
    batches = [r.metrics.get("batch", 1) for tr, _, _ in results for r in tr.records]
    assert max(batches) > 1, "the devices never shared a round"
