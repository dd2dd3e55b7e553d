"""The shortfall notes quote the measured figures and stay silent when a target is met."""

from mobillm.bench import explain


def _cost(method, b, s, mem, sps, **kw):
    return {
        "mode": "cost",
        "method": method,
        "model": "qwen2.5-coder-1.5b",
        "batch": b,
        "seq": s,
        "codec": "int8",
        "peak_rss_mb": mem,
        "seconds_per_sample": sps,
        **kw,
    }


def _race(method, final, full, secs, link=0.0):
    return {
        "mode": "race",
        "method": method,
        "model": "smollm2-135m",
        "link_mbps": link,
        "curve": [{"samples": 100, "train_seconds": secs, "accuracy": final}],
        "final_accuracy": final,
        "full_dev_accuracy": full,
        "train_seconds": secs,
    }


def test_memory_and_speed_notes_bound_the_ratio_by_what_was_measured():
    rs = [
        _cost("mobillm", 2, 128, 7000, 1.0, weights_mb=6500),
        _cost("lora", 2, 128, 9000, 2.0),
        _cost("side_local", 2, 128, 7100, 1.5),
        _cost("mobillm", 8, 128, 7200, 1.0, weights_mb=6500),
        _cost("lora", 8, 128, 13000, 2.1),
        _cost("mobillm", 16, 128, 7400, 1.0, weights_mb=6500),
        {**_cost("lora", 16, 128, 0, 0), "oom": True, "limit_mb": 21504},
    ]
    notes = explain.notes(rs, {"qwen2.5-coder-1.5b": 4.0}, 2.3)
    mem, speed = notes
    assert "memory (1.81 < 4) at 8x128" in mem and "extra 5.66 GB" in mem
    assert "about 28.1 GB, more than the 21.0 GB" in mem and "out of reach here" in mem
    assert "untied LM head" not in mem  # 6.35 GB of parameters, all resident
    rs[3]["weights_mb"] = 8000  # more parameters than the peak: the head was never read
    assert "untied LM head" in explain.notes(rs, {"qwen2.5-coder-1.5b": 4.0}, 2.3)[0]
    assert "(2.10 < 2.3)" in speed and "LoRA's is a forward pass" in speed


def test_no_notes_when_targets_are_met():
    rs = [
        _cost("mobillm", 8, 128, 1000, 0.5, weights_mb=900),
        _cost("lora", 8, 128, 5000, 1.5),
        _race("lora", 0.86, 0.87, 300),
        _race("mobillm", 0.86, 0.865, 100),
    ]
    assert explain.notes(rs, {"qwen2.5-coder-1.5b": 4.0}, 2.3) == []


def test_race_note_separates_accuracy_from_speed_and_isolates_the_codec():
    rs = [
        _race("lora", 0.88, 0.885, 300),
        _race("mobillm", 0.84, 0.845, 100),
        _race("side_local", 0.845, 0.846, 150),
    ]
    time_note, acc_note = explain.notes(rs, {}, 2.3)
    assert "stays below the target (0.8700)" in time_note and "3.00x faster" in time_note
    assert "LoRA 0.8850 against the ladder 0.8450" in acc_note
    assert "reaches 0.8460" in acc_note and "cost 0.10 points" in acc_note
    assert "linear probe" in acc_note


def test_offload_notes_compare_mobillm_with_the_same_side_network_on_device():
    rs = [
        _cost("mobillm", 8, 128, 5000, 1.0),
        _cost("lora", 8, 128, 9000, 2.0),
        _cost("side_local", 8, 128, 6000, 1.5),
        _race("side_local", 0.82, 0.822, 170),
        _race("mobillm", 0.83, 0.831, 160),
    ]
    cost, race, summary = explain.offload_notes(rs)
    assert "at 8x128" in cost and "(ratios 1.20 and 1.50)" in cost
    assert "170 s to 0.8220" in race and "160 s to 0.8310" in race
    assert "never back-propagating" in summary
    assert explain.offload_notes([_race("lora", 0.9, 0.9, 300)]) == []


def test_split_note_says_where_the_time_went():
    from mobillm.bench.explain import race_notes

    curve = lambda acc: [{"samples": 100, "train_seconds": 10.0, "accuracy": acc}]  # noqa: E731
    race = {"mode": "race", "link_mbps": 0.0}
    lora = race | {"method": "lora", "curve": curve(0.90), "final_accuracy": 0.90}
    lora |= {"full_dev_accuracy": 0.88, "train_seconds": 290.0}
    split = race | {"method": "mobillm", "split_layers": 16, "curve": curve(0.87)}
    split |= {"final_accuracy": 0.87, "full_dev_accuracy": 0.881, "train_seconds": 495.0}
    split |= {"forward_seconds": 73.0, "server_epochs": 3, "probe": 300}
    (note,) = race_notes([lora, split])
    assert "whole-dev accuracy 0.8810 against LoRA's 0.8800" in note
    assert "73 s of 495 s" in note and "16 layers forward and backward for 3 epochs" in note
