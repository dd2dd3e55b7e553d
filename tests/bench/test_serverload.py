"""``mobillm bench server``'s simulated devices drive both label modes through the server path,
and the rendered page keeps the modes apart."""

import pytest

from mobillm.bench.serverload import LoadConfig, render, run_load


@pytest.mark.parametrize("private", [False, True])
def test_simulated_devices_train_through_the_session_manager(tmp_path, private):
    cfg = LoadConfig(
        shape="smollm2-135m", sessions=2, batch=2, steps=2, warmup=0, max_batch=2, private=private
    )
    rec = run_load(cfg, tmp_path)
    assert rec["private"] is private and rec["session_steps_per_s"] > 0
    assert rec["ack_p50_ms"] <= rec["ack_p99_ms"]


def test_render_pairs_rows_of_one_label_mode():
    def row(max_batch, private, rate):
        return LoadConfig(sessions=64, max_batch=max_batch, private=private).to_dict() | {
            "frames_source": "synthetic",
            "session_steps_per_s": rate,
            "ack_p50_ms": 1.0,
            "ack_p99_ms": 2.0,
            "memory_per_session_mb": 1.0,
            "machine": "x86_64, 2 cores",
        }

    page = render([row(1, False, 10), row(64, False, 60), row(1, True, 8), row(64, True, 24)], "c")
    assert "64 sessions: **6.00x**" in page
    assert "64 sessions, private labels: **3.00x**" in page
    assert "batched / unbatched = 6.00 (target >= 5: **met**)" in page
