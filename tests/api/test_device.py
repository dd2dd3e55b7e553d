"""The public API on a tiny model: ``mobillm.Device`` trains, evaluates, saves, loads and
generates, with records or files, in-process or against a ``mobillm.Server``."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import jsonschema
import pytest

import mobillm
from mobillm.errors import ConfigError
from mobillm.transport.schema import SIDE_META_PATH

ROOT = Path(__file__).resolve().parents[2]

CONFIG = mobillm.DataConfig(
    text_column="review",
    label_column="stars",
    labels=("neg", "pos"),
    verbalizers=("negative", "positive"),
    template="Review: {text}\nSentiment:",
    batch_size=4,
)


def reviews(n: int) -> list[dict[str, str]]:
    return [
        {"review": f"a {'good' if i % 2 else 'bad'} movie {i}", "stars": "pos" if i % 2 else "neg"}
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def device(model_dir):
    return mobillm.Device(model_dir)


def test_public_names_are_documented_and_importable():
    for name in mobillm.__all__:
        obj = getattr(mobillm, name)
        if name != "__version__":
            assert obj.__doc__ and obj.__doc__.strip(), f"mobillm.{name} has no docstring"
    assert set(mobillm._PUBLIC) == set(mobillm.__all__) - {"__version__"}
    for cls in (mobillm.Device, mobillm.Server, mobillm.ServerProcess):
        for attr, member in vars(cls).items():
            if not attr.startswith("_") and callable(member):
                assert member.__doc__, f"mobillm.{cls.__name__}.{attr} has no docstring"
    with pytest.raises(AttributeError):
        mobillm.NotAThing  # noqa: B018


def test_train_on_records_then_evaluate_save_and_load(device, model_dir, tmp_path):
    seen: list[dict] = []
    run = device.train(
        reviews(24),
        reviews(8),
        config=CONFIG,
        streaming=mobillm.DeviceConfig(epochs=2, validation_fraction=0.0),
        out=tmp_path / "run",
        callback=seen.append,
    )
    assert run["before"]["samples"] == run["after"]["samples"] == 8
    assert run["train"]["server_epochs"] == 2 and not run["train"]["stopped"]
    steps = [r for r in seen if "step" in r]
    # 24 samples / batch 4, 2 epochs: with private labels (the default for classification)
    # the device sends the second epoch's steps too, as replays of the server's cache
    assert [r["step"] for r in steps] == list(range(1, 13))
    assert {"examples", "session", "evaluated", "epoch"} <= {k for r in seen for k in r}
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["after"] == run["after"]
    # the device now holds the trained side network: evaluate it on records or a file
    assert device.evaluate(reviews(8)) == {**run["after"], "seconds": pytest.approx(0, abs=60)} | {
        "labels": ["neg", "pos"]
    }
    saved = device.save(tmp_path / "copy")
    side_json = json.loads((saved / "side.json").read_text())  # what Download's meta_json held
    jsonschema.validate(side_json, json.loads((ROOT / SIDE_META_PATH).read_text()))
    other = mobillm.Device(model_dir).load(saved)
    assert other.task is not None and other.task.template == CONFIG.template
    path = tmp_path / "dev.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in reviews(8)))
    res = other.evaluate(path, predictions=True)
    assert res["accuracy"] == run["after"]["accuracy"] and len(res["predictions"]) == 8


def test_datasets_dataset_and_zero_shot(model_dir):
    import datasets

    fresh = mobillm.Device(model_dir)  # no side network: the frozen backbone, zero-shot
    ds = datasets.Dataset.from_list(reviews(8))
    zero = fresh.evaluate(ds, config=CONFIG)
    assert zero["samples"] == 8 and zero["labels"] == ["neg", "pos"]
    with pytest.raises(ConfigError, match="verbalizers"):
        fresh.evaluate(ds, config=CONFIG.replace(verbalizers=()))
    with pytest.raises(ConfigError, match="config="):
        fresh.evaluate(reviews(4))
    with pytest.raises(ConfigError, match="train one or load one"):
        fresh.save("nowhere")


def test_stop_ends_training_early_and_keeps_the_side_network(device, tmp_path):
    stop = threading.Event()

    def callback(r: dict) -> None:
        if r.get("step") == 2:
            stop.set()

    run = device.train(
        reviews(40), config=CONFIG, out=tmp_path / "run", callback=callback, stop=stop,
        evaluate=False,
    )  # fmt: skip
    t = run["train"]
    assert t["stopped"] and t["server_epochs"] == 0
    assert 2 <= t["steps"] < 10  # the window's steps in flight finish, nothing after
    assert device.evaluate(reviews(4))["samples"] == 4


def test_causal_lm_generate(model_dir, tmp_path):
    lm = mobillm.Device(model_dir)
    rows = [{"prompt": f"Q: {i}?\nA:", "response": f" {i}"} for i in range(8)]
    lm.train(rows, config=mobillm.DataConfig(task="causal_lm", batch_size=4), out=tmp_path / "lm")
    text = lm.generate("Q: 3?\nA:", max_new_tokens=4)
    assert isinstance(text, str)
    assert isinstance(lm.generate("Q: 3?\nA:", max_new_tokens=4, frozen=True), str)
    with pytest.raises(ConfigError, match="causal-LM"):
        mobillm.Device(model_dir).generate("hi")
    with pytest.raises(ConfigError, match="this model takes 2048"):  # its position table
        lm.generate("word " * 2100)


def test_lengths_the_model_cannot_take_are_clear_errors(device, tmp_path):
    with pytest.raises(ConfigError, match="more than the 2048 positions"):
        device.train(reviews(8), config=CONFIG.replace(max_length=4096), out=tmp_path / "a")
    rows = [{"prompt": f"Q: what is {i} plus {i}?\nA:", "response": f" {2 * i}"} for i in range(8)]
    lm = mobillm.DataConfig(task="causal_lm", batch_size=4, max_length=4)
    with pytest.raises(ConfigError, match="none of the 7 training examples"):
        device.train(rows, config=lm, out=tmp_path / "b")  # one of the 8 validates


def test_train_against_a_server_in_a_thread(device, tmp_path):
    config = mobillm.ServerConfig(open_access=True, workdir=str(tmp_path / "server"))
    with mobillm.Server(config) as server:
        run = device.train(
            reviews(16), config=CONFIG, server=server, out=tmp_path / "run", evaluate=False
        )
        assert server.manager.num_live() == 0  # closed after the download
    assert run["train"]["steps"] >= 4 and run["server"]["steps"] >= 4


def test_train_against_a_server_on_an_event_loop(device, tmp_path):
    config = mobillm.ServerConfig(open_access=True, workdir=str(tmp_path / "server"))

    async def main() -> dict:
        server = mobillm.Server(config)
        task = asyncio.create_task(server.serve_async())
        while not server.port:
            await asyncio.sleep(0.01)
        try:
            return await asyncio.to_thread(
                device.train, reviews(16), config=CONFIG, server=server.address,
                out=tmp_path / "run", evaluate=False,
            )  # fmt: skip
        finally:
            task.cancel()

    run = asyncio.run(main())
    assert run["train"]["steps"] >= 4


def test_bad_server_argument_is_one_clear_error(device, tmp_path):
    with pytest.raises(ConfigError, match="server must be"):
        device.train(reviews(8), config=CONFIG, server=42, out=tmp_path / "r", evaluate=False)
    with pytest.raises(ConfigError, match="only with records"):
        device.train(CONFIG, config=CONFIG, out=tmp_path / "r")
    with pytest.raises(ConfigError, match="cannot resume"):
        device.train(reviews(8), config=CONFIG, out=tmp_path / "none", resume=True)
    # a run started with randomized labels resumes with the same epsilon, or not at all
    started = tmp_path / "eps"
    started.mkdir()
    session = {"session_id": "s", "token": "t", "need_head": False}
    record = {"session": session, "label_epsilon": 1.0}
    (started / "session.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError, match="label epsilon 0: the run was started with 1"):
        device.train(reviews(8), config=CONFIG, out=started, resume=True)
