"""``mobillm eval`` on the user's own eval file alone: no train file, with --side or --zero-shot."""

import json
from pathlib import Path

import pytest
from clidata import TASK_FLAGS, write_reviews

from mobillm.cli.main import main


def write_replies(path, n: int) -> str:
    rows = [{"prompt": f"Q: {i} plus {i}?\nA:", "response": f" {2 * i}"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def run_json(capsys, *argv) -> dict:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def cls_side(tmp_path_factory, model_dir):
    """A classification side network trained with non-default columns, labels and template."""
    d = tmp_path_factory.mktemp("cls")
    train = write_reviews(d / "train.tsv", 4)
    argv = ["train", "--model", model_dir, "--train-file", train, *TASK_FLAGS]
    code = main(
        [*argv, "--max-steps", "2", "--batch-size", "4", "--no-eval", "--out", str(d / "side")]
    )
    assert code == 0
    return str(d / "side")


@pytest.fixture(scope="module")
def lm_side(tmp_path_factory, model_dir):
    d = tmp_path_factory.mktemp("lm")
    train = write_replies(d / "train.jsonl", 8)
    code = main(
        [
            "train",
            "--model",
            model_dir,
            "--task",
            "causal_lm",
            "--train-file",
            train,
            "--max-steps",
            "2",
            "--batch-size",
            "4",
            "--no-eval",
            "--out",
            str(d / "side"),
        ]
    )
    assert code == 0
    return str(d / "side")


def test_side_needs_only_the_eval_file(capsys, tmp_path, model_dir, cls_side):
    dev = write_reviews(tmp_path / "dev.tsv", 3)
    capsys.readouterr()
    res = run_json(capsys, "eval", "--model", model_dir, "--side", cls_side, "--eval-file", dev)
    assert res["samples"] == 6 and 0.0 <= res["accuracy"] <= 1.0
    assert res["labels"] == ["neg", "pos"]
    # The saved task is what the short form used: spelling it out gives the same figure.
    full = run_json(
        capsys, "eval", "--model", model_dir, "--side", cls_side, "--eval-file", dev, *TASK_FLAGS
    )
    assert full["accuracy"] == res["accuracy"]


def test_side_remembers_its_model(capsys, tmp_path, model_dir, cls_side):
    """Without --model, eval loads the model the side network was trained on (the default
    model would not fit it)."""
    dev = write_reviews(tmp_path / "dev.tsv", 3)
    capsys.readouterr()
    res = run_json(capsys, "eval", "--side", cls_side, "--eval-file", dev)
    assert res["model"] == str(Path(model_dir).resolve()) and res["samples"] == 6


def test_side_causal_lm_needs_only_the_eval_file(capsys, tmp_path, model_dir, lm_side):
    dev = write_replies(tmp_path / "dev.jsonl", 3)
    capsys.readouterr()
    res = run_json(capsys, "eval", "--model", model_dir, "--side", lm_side, "--eval-file", dev)
    assert res["loss"] > 0 and res["tokens"] > 0


def test_zero_shot_on_a_quoted_tsv(capsys, tmp_path, model_dir):
    dev = write_reviews(tmp_path / "dev.tsv", 3)
    res = run_json(
        capsys, "eval", "--model", model_dir, "--zero-shot", "--eval-file", dev, *TASK_FLAGS
    )
    assert res["samples"] == 6 and res["side"] == "zero-shot"
    # Without --labels they are inferred from the eval file itself (sorted: neg, pos).
    flags = [f for f in TASK_FLAGS if f not in ("--labels", "neg,pos")]
    inferred = run_json(
        capsys, "eval", "--model", model_dir, "--zero-shot", "--eval-file", dev, *flags
    )
    assert inferred["labels"] == ["neg", "pos"]
    assert inferred["accuracy"] == res["accuracy"]


def test_zero_shot_causal_lm(capsys, tmp_path, model_dir):
    dev = write_replies(tmp_path / "dev.jsonl", 3)
    res = run_json(
        capsys,
        "eval",
        "--model",
        model_dir,
        "--zero-shot",
        "--task",
        "causal_lm",
        "--eval-file",
        dev,
    )
    assert res["loss"] > 0 and res["tokens"] > 0


def test_zero_shot_classification_needs_verbalizers(capsys, tmp_path, monkeypatch):
    from mobillm.backbone import Backbone

    def no_load(*a, **kw):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(Backbone, "load", no_load)
    dev = write_reviews(tmp_path / "dev.tsv", 1)
    code = main(
        [
            "eval",
            "--zero-shot",
            "--eval-file",
            dev,
            "--text-column",
            "review",
            "--label-column",
            "stars",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert [ln for ln in err.splitlines() if "error:" in ln] == [err.strip()]
    assert "--verbalizers" in err


def test_train_reaches_the_server_before_evaluating(capsys, tmp_path, model_dir):
    """No server at the address: the run ends at the handshake, before any evaluation."""
    import socket
    import time

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = write_reviews(tmp_path / "train.tsv", 4)
    t0 = time.perf_counter()
    code = main(
        ["train", "--model", model_dir, "--train-file", data, "--eval-file", data, *TASK_FLAGS,
         "--server", f"127.0.0.1:{port}", "--out", str(tmp_path / "side")]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "cannot reach server" in err, err
    assert "evaluating the untrained" not in err and "before:" not in err
    assert time.perf_counter() - t0 < 30


def test_train_in_process_reports_the_session_then_evaluates(capsys, tmp_path, model_dir):
    data = write_reviews(tmp_path / "train.tsv", 6)
    res = run_json(
        capsys, "train", "--model", model_dir, "--train-file", data, "--eval-file", data,
        *TASK_FLAGS, "--batch-size", "4", "--out", str(tmp_path / "side"),
    )  # fmt: skip
    assert res["before"]["samples"] == res["after"]["samples"] == 12
    # private labels (the classification default): the device scores the one validation step
    # itself before training and after each of the 3 epochs, replaying it from the server's cache
    assert res["train"]["server_epochs"] == 3 and res["train"]["validation_steps"] == 4


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_side_and_zero_shot_on_the_same_rows_in_other_formats(
    capsys, tmp_path, model_dir, cls_side, fmt
):
    import datasets

    tsv = write_reviews(tmp_path / "dev.tsv", 3)
    rows = datasets.load_dataset("csv", data_files=tsv, sep="\t", split="train")
    other = str(tmp_path / f"dev.{fmt}")
    rows.to_json(other) if fmt == "jsonl" else rows.to_parquet(other)
    capsys.readouterr()
    for mode in (["--side", cls_side], ["--zero-shot", *TASK_FLAGS]):
        want = run_json(capsys, "eval", "--model", model_dir, *mode, "--eval-file", tsv)
        got = run_json(capsys, "eval", "--model", model_dir, *mode, "--eval-file", other)
        assert got["samples"] == want["samples"] == 6
        assert got["accuracy"] == want["accuracy"]
