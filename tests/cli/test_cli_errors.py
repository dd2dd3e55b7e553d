"""Bad input to the CLI ends with one clear line on stderr and exit code 2, never a traceback."""

import subprocess
import sys
import time

import pytest
import torch
from tinymodels import tiny_model

from mobillm.cli.main import main


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, bos_tokenizer):
    """Two tiny Llama folders (same architecture, different weights)."""
    dirs = []
    for seed in (0, 1):
        d = tmp_path_factory.mktemp(f"tiny{seed}")
        tiny_model("llama", vocab=len(bos_tokenizer), seed=seed).save_pretrained(d)
        bos_tokenizer.save_pretrained(d)
        dirs.append(d)
    return dirs


def _run(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse refusing an option exits 2 itself
        code = e.code
    err = capsys.readouterr().err
    return code, err


def _one_clear_line(code, err, *needles):
    assert code == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if "error:" in ln]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]


def _tsv(path, rows, header="sentence\tlabel"):
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return str(path)


def test_missing_model_path(capsys, tmp_path):
    f = _tsv(tmp_path / "t.tsv", ["good film\t1", "bad film\t0"])
    code, err = _run(
        capsys,
        "train",
        "--model",
        str(tmp_path / "no.gguf"),
        "--train-file",
        f,
        "--text-column",
        "sentence",
        "--out",
        str(tmp_path / "o"),
    )
    _one_clear_line(code, err, "GGUF file not found")
    code, err = _run(
        capsys,
        "train",
        "--model",
        str(tmp_path / "nodir"),
        "--train-file",
        f,
        "--text-column",
        "sentence",
        "--out",
        str(tmp_path / "o"),
    )
    _one_clear_line(code, err, "model not found")


def test_unsupported_gguf(capsys, tmp_path, monkeypatch):
    gguf = pytest.importorskip("gguf")
    monkeypatch.setenv("MOBILLM_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "rwkv.gguf"
    w = gguf.GGUFWriter(str(path), "rwkv6")
    w.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = _tsv(tmp_path / "t.tsv", ["good film\t1", "bad film\t0"])
    code, err = _run(
        capsys,
        "train",
        "--model",
        str(path),
        "--train-file",
        f,
        "--text-column",
        "sentence",
        "--out",
        str(tmp_path / "o"),
    )
    _one_clear_line(code, err, "cannot load GGUF", "rwkv6")


def test_missing_column_and_unknown_label(capsys, tmp_path, model_dirs):
    f = _tsv(tmp_path / "t.tsv", ["good film\t1", "bad film\t0"], header="text\tstars")
    code, err = _run(
        capsys,
        "train",
        "--model",
        str(model_dirs[0]),
        "--train-file",
        f,
        "--out",
        str(tmp_path / "o"),
    )
    _one_clear_line(code, err, "t.tsv", "label")
    g = _tsv(tmp_path / "u.tsv", ["good film\t1", "meh film\tmaybe"])
    code, err = _run(
        capsys,
        "train",
        "--model",
        str(model_dirs[0]),
        "--train-file",
        g,
        "--text-column",
        "sentence",
        "--labels",
        "0,1",
        "--out",
        str(tmp_path / "o"),
    )
    _one_clear_line(code, err, "maybe", "row 2")


def test_side_network_for_another_backbone(capsys, tmp_path, model_dirs):
    rows = [f"{w} film number {i}\t{int(w == 'good')}" for i in range(8) for w in ("good", "bad")]
    f = _tsv(tmp_path / "t.tsv", rows)
    out = tmp_path / "side"
    code = main(
        [
            "train",
            "--model",
            str(model_dirs[0]),
            "--train-file",
            f,
            "--eval-file",
            f,
            "--text-column",
            "sentence",
            "--batch-size",
            "8",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    capsys.readouterr()
    code, err = _run(
        capsys, "eval", "--model", str(model_dirs[1]), "--side", str(out), "--eval-file", f
    )
    _one_clear_line(code, err, "another backbone")
    code, err = _run(
        capsys,
        "eval",
        "--model",
        str(model_dirs[0]),
        "--side",
        str(tmp_path / "x"),
        "--eval-file",
        f,
    )
    _one_clear_line(code, err, "not found")


def test_bad_flag_values(capsys, tmp_path, model_dirs):
    f = _tsv(tmp_path / "t.tsv", ["good film\t1", "bad film\t0"])
    code, err = _run(
        capsys,
        "train",
        "--model",
        str(model_dirs[0]),
        "--train-file",
        f,
        "--text-column",
        "sentence",
        "--codec",
        "int3",
        "--out",
        str(tmp_path / "o"),
    )
    _one_clear_line(code, err, "int3")
    code, err = _run(
        capsys,
        "train",
        "--model",
        str(model_dirs[0]),
        "--train-file",
        str(tmp_path / "missing.tsv"),
        "--out",
        str(tmp_path / "o"),
    )
    _one_clear_line(code, err, "missing.tsv")


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--codec", "int3"),
        ("--positions", "first"),
        ("--pooling", "max"),
        ("--mixer", "lstm"),
        ("--dtype", "int8"),
        ("--schedule", "step"),
        ("--taps", "every:0"),
        ("--taps", "first,last"),
        ("--group-size", "48"),
        ("--reduction", "0"),
        ("--window", "0"),
        ("--epochs", "0"),
        ("--dropout", "1.5"),
        ("--lr", "2"),
        ("--link-mbps", "-1"),
        ("--quoting", "double"),
        ("--format", "xml"),
    ],
)
def test_bad_option_fails_before_any_model_load(capsys, tmp_path, monkeypatch, flag, value):
    from mobillm.backbone import Backbone

    def no_load(*a, **kw):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(Backbone, "load", no_load)
    f = _tsv(tmp_path / "t.tsv", ["good film\t1", "bad film\t0"])
    argv = ["train", "--train-file", f, "--text-column", "sentence", "--out", str(tmp_path / "o")]
    code, err = _run(capsys, *argv, flag, value)
    _one_clear_line(code, err, flag, repr(value))
    assert len(err.strip().splitlines()) == 1, err  # no usage block either
    assert not (tmp_path / "o").exists()


def test_bad_codec_from_the_shell(tmp_path):
    f = _tsv(tmp_path / "t.tsv", ["good film\t1", "bad film\t0"])
    argv = ["train", "--model", str(tmp_path / "nomodel"), "--train-file", f, "--codec", "int3"]
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "mobillm.cli.main", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    # Python and torch start in a few seconds on a busy machine; loading a model would take more
    # and fail on the missing model folder instead.
    assert time.perf_counter() - t0 < 30
    _one_clear_line(proc.returncode, proc.stderr, "mobillm train: error:", "--codec", "'int3'")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
