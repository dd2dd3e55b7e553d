"""``mobillm bench faults`` at a small size: real server and device processes, every scenario."""

import pytest

from mobillm.bench.faults import FaultsConfig, Harness
from mobillm.bench.faults_report import render


@pytest.mark.slow
def test_fault_harness_small(tmp_path):
    cfg = FaultsConfig(
        fuzz_messages=1500,
        disconnects=2,
        server_kills=1,
        device_kills=0,  # tests/cli/test_train_resume.py kills devices
        soak_devices=1,
        soak_seconds=2,
        attack_lease_seconds=8,  # the 20-open flood must end before any lease runs out
        samples=96,
        out=str(tmp_path),
    )
    r = Harness(cfg, lambda m: None).run()
    f = r["fuzz"]
    assert f["messages"] >= 1500 and not (f["crashes"] or f["hangs"] or f["internal"]), f
    assert f["legit_weights_identical"]
    d = r["disconnects"]
    assert d["device_exit"] == 0 and d["weights_identical"] and d["reconnects"] >= d["disconnects"]
    k = r["server_kills"]
    assert k["kills"] == 1 and k["device_exit"] == 0 and k["weights_identical"]
    assert all(x["acked_steps_redone"] <= 1 for x in k["per_kill"])
    assert r["soak"]["failures"] == 0 and r["soak"]["runs"] >= 1
    a = r["attacks"]
    assert all(x["refused"] for x in a["replays"]), a["replays"]
    assert a["victim_weights_identical"] and a["server_alive_throughout"]
    doc = render(r, None)
    assert "| fuzz: crashes / hangs / INTERNAL | 0 / 0 / 0 | 0 / 0 / 0 | **met** |" in doc
