"""The comparison benchmark's machinery on tiny models: each method in its own process."""

import json

import pytest
from tinymodels import tiny_model

from mobillm.bench.compare import Job, run_job
from mobillm.bench.report import cost_tables, race_tables, time_to, write_doc


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, bos_tokenizer):
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", vocab=len(bos_tokenizer)).save_pretrained(d)
    bos_tokenizer.save_pretrained(d)
    return str(d)


@pytest.mark.parametrize("method", ["mobillm", "lora", "full", "side_local"])
def test_cost_job_each_method(tmp_path, tiny_dir, method):
    logs = []
    r = run_job(
        Job("cost", method, tiny_dir, batch=4, seq=16, lr=1e-3, steps=2),
        tmp_path,
        mem_limit_mb=8000,
        threads=1,
        log=logs.append,
    )
    assert "error" not in r and not r.get("oom"), r
    assert r["peak_rss_mb"] > 100 and r["seconds_per_sample"] > 0
    assert 0 < r["weights_mb"] < r["peak_rss_mb"]
    assert len(r["step_seconds"]) == 3
    if method == "mobillm":
        # 3 taps x 4 rows x (32 + 4) int8 bytes + 36-byte headers, per sample
        assert r["bytes_per_sample"] == pytest.approx(3 * (36 + 36 / 4))
        assert r["server_peak_rss_mb"] > 100
    else:
        assert r["trainable"] > 0
    assert any("started" in x for x in logs)


def test_memory_watchdog_stops_a_job(tmp_path, tiny_dir):
    r = run_job(
        Job("cost", "lora", tiny_dir, batch=2, seq=8, lr=1e-3),
        tmp_path,
        mem_limit_mb=50,
        threads=1,
        log=lambda s: None,
    )
    assert r["oom"] and r["limit_mb"] == 50


def test_race_job_mobillm_and_report(tmp_path, tiny_dir):
    results = []
    for method in ("lora", "mobillm"):
        r = run_job(
            Job("race", method, tiny_dir, batch=16, budget=64, lr=1e-3, checkpoints=2),
            tmp_path / method,
            mem_limit_mb=8000,
            threads=1,
            log=lambda s: None,
        )
        assert "error" not in r, r
        assert [p["samples"] for p in r["curve"]] == [32, 64]
        assert 0 <= r["final_accuracy"] <= 1
        # every method is also scored on the whole dev set, MobiLLM included
        assert 0 <= r["full_dev_accuracy"] <= 1 and r["dev"] >= r["probe"] > 0
        results.append(r)
    assert results[1]["bytes_per_sample"] > 0
    # the server's CPU time and optimizer steps, for its seconds per step
    assert results[1]["server_cpu_seconds"] > 0 and results[1]["server_optimizer_steps"] == 4
    md, verdicts = race_tables(results)
    assert "LoRA" in md and any("Dev accuracy after the same budget" in v for v in verdicts)
    assert "Cost per mode" in md and "server CPU s/step" in md
    text = write_doc(results, tmp_path, tmp_path / "bench.md", "mobillm bench compare --x")
    assert "accuracy_vs_time.png" in text and (tmp_path / "accuracy_vs_time.png").is_file()


def _cost(method, model, b, s, mem, sps, **kw):
    return {
        "mode": "cost",
        "method": method,
        "model": model,
        "batch": b,
        "seq": s,
        "codec": "int8",
        "peak_rss_mb": mem,
        "seconds_per_sample": sps,
        "server_peak_rss_mb": 500.0,
        "bytes_per_sample": 17000.0,
        **kw,
    }


def test_cost_verdicts_use_the_largest_setting_where_lora_fits():
    rs = [
        _cost("mobillm", "smollm2-135m", 8, 128, 1000, 0.1),
        _cost("lora", "smollm2-135m", 8, 128, 2500, 0.3),
        _cost("mobillm", "smollm2-135m", 32, 256, 1100, 0.1),
        _cost("lora", "smollm2-135m", 32, 256, 4000, 0.35),
        _cost("mobillm", "smollm2-135m", 64, 512, 1300, 0.1),
        {**_cost("lora", "smollm2-135m", 64, 512, 0, 0), "oom": True, "limit_mb": 21000},
    ]
    md, verdicts = cost_tables(rs)
    assert "OOM (> 21 GB)" in md and "**2.50**" in md
    assert "(32x256)" in verdicts[0] and "= 3.64 (target >= 3: **met**)" in verdicts[0]
    assert "= 3.50 (target >= 2.3: **met**)" in verdicts[0]
    json.dumps(rs)  # results stay JSON-friendly


def test_int8_device_rows_and_their_speed_verdict():
    rs = [
        _cost("mobillm", "qwen2.5-coder-1.5b", 1, 128, 3000, 1.0),
        _cost("mobillm", "qwen2.5-coder-1.5b", 1, 128, 1500, 0.5, device_quant="int8"),
        _cost("lora", "qwen2.5-coder-1.5b", 1, 128, 9000, 2.0),
    ]
    md, verdicts = cost_tables(rs)
    assert "int8 device backbone" in md  # the smallest-memory table names it
    int8 = [v for v in verdicts if "int8" in v]
    assert len(int8) == 1 and "= 4.00 (target >= 3.5: **met**)" in int8[0]
    rs[1]["seconds_per_sample"] = 1.0
    assert any("= 2.00 (target >= 3.5: **not met**)" in v for v in cost_tables(rs)[1])


def test_time_to_target():
    curve = [{"train_seconds": 10, "accuracy": 0.8}, {"train_seconds": 20, "accuracy": 0.86}]
    assert time_to(curve, 0.85) == 20 and time_to(curve, 0.9) is None
