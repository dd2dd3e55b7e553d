"""Read data files or in-memory records into examples, with seeded hold-out and sub-sampling.

Files are read by Hugging Face ``datasets`` (TSV/CSV with standard quoting, JSONL, Parquet,
Arrow), or taken from any iterable of records. Every error is a ``DataError`` naming the file
and the row, so a user can find it. Rows whose text is empty are skipped and counted in a
warning.
"""

from __future__ import annotations

import csv
import logging
import numbers
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mobillm.config import check
from mobillm.data.config import FORMATS, DataConfig, resolve_preset
from mobillm.data.examples import ClassificationExample, DataError, Example, LMExample

log = logging.getLogger(__name__)

_EXTENSIONS = {
    ".tsv": "tsv",
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".arrow": "arrow",
}
# The Hugging Face `datasets` builder that reads each format.
_BUILDERS = {"tsv": "csv", "csv": "csv", "jsonl": "json", "parquet": "parquet", "arrow": "arrow"}
_FLAGS = {
    "text_column": "--text-column",
    "label_column": "--label-column",
    "prompt_column": "--prompt-column",
    "response_column": "--response-column",
}
HUB = "hub:"
RECORDS = "records"  # what errors call data given as records, not a file

# (where, row): where is "row 7" (the 7th record after the header) and is what errors quote.
Row = tuple[str, dict[str, Any]]
Records = Iterable[Mapping[str, Any]]


def detect_format(path: str | Path, fmt: str = "auto") -> str:
    """The file's format (see ``FORMATS``): ``fmt`` itself, or guessed from the extension."""
    if fmt != "auto":
        return fmt
    found = _EXTENSIONS.get(Path(path).suffix.lower())
    if found is None:
        raise DataError(
            f"{path}: cannot tell the format from the extension {Path(path).suffix!r} "
            f"(known: {sorted(_EXTENSIONS)}); set --format {'|'.join(FORMATS[1:])}"
        )
    return found


def _decode_error(path: Path, encoding: str) -> DataError:
    """Where ``path`` stops being ``encoding``, as a line number an editor shows."""
    raw = path.read_bytes()
    try:
        raw.decode(encoding)
        at = ""
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        at = f": line {line} is not valid {encoding} (byte 0x{raw[e.start]:02x})"
    hint = "" if encoding.lower().replace("_", "-") == "latin-1" else ", e.g. --encoding latin-1"
    return DataError(f"{path}{at}; set --encoding to the file's encoding{hint}")


def _builder_kwargs(fmt: str, encoding: str, quoting: str) -> dict[str, Any]:
    if fmt not in ("tsv", "csv"):
        return {"encoding": encoding} if fmt == "jsonl" else {}
    return {
        "sep": "\t" if fmt == "tsv" else ",",
        "encoding": encoding,
        # GLUE TSVs (SST-2) hold unpaired quotes; quoting on would swallow whole lines.
        "quoting": csv.QUOTE_NONE if quoting == "none" else csv.QUOTE_MINIMAL,
        # Texts stay texts: "NA", "null" or "" are not missing values.
        "keep_default_na": False,
        "na_filter": False,
    }


def _load(source: str, fmt: str, kwargs: dict[str, Any]) -> Any:
    """A ``datasets.Dataset`` of one file (or a hub data set), quietly."""
    import datasets

    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # we raise our own errors
    bars = datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        if source.startswith(HUB):
            name, _, split = source[len(HUB) :].partition("@")
            return datasets.load_dataset(name, split=split or "train")
        if fmt in ("tsv", "csv"):
            kwargs = {**kwargs, "features": _text_features(source, kwargs)}
        return datasets.load_dataset(_BUILDERS[fmt], data_files=source, split="train", **kwargs)
    finally:
        datasets.logging.set_verbosity(level)
        if not bars:
            datasets.enable_progress_bars()


def _text_features(source: str, kwargs: dict[str, Any]) -> Any:
    """Every column of a table as text: "007" stays "007", a label "1" stays "1"."""
    import datasets
    import pandas as pd

    head = pd.read_csv(source, nrows=1, **kwargs)
    if not isinstance(head.index, pd.RangeIndex):
        # pandas silently makes a first row with a field too many into an index: refuse it.
        tab = "; is there a tab inside a text?" if kwargs["sep"] == "\t" else ""
        raise DataError(f"row 1 has more fields than the header's {len(head.columns)}{tab}")
    return datasets.Features({str(c): datasets.Value("string") for c in head.columns})


def _read_error(path: Path, fmt: str, quoting: str, err: Exception) -> DataError:
    cause = err.__cause__ or err
    if isinstance(cause, DataError):
        return DataError(f"{path}: {cause}")
    if isinstance(cause, UnicodeDecodeError):
        return _decode_error(path, getattr(cause, "encoding", "") or "utf-8")
    name = type(cause).__name__
    msg = str(cause).replace("Error tokenizing data. C error: ", "")
    if name == "EmptyDataError":
        return DataError(f"{path}: file is empty (expected a header row)")
    if "corresponds to no data" in str(err):
        return DataError(f"{path}: no rows in the file")
    hint = ""
    if fmt in ("tsv", "csv") and "EOF inside string" in msg and quoting != "none":
        hint = (
            "; a field that opens with a quote must close with one (set --quoting none if the "
            "file's quotes are plain text)"
        )
    elif fmt in ("tsv", "csv") and "fields" in msg:
        hint = "; is there a tab inside a text?" if fmt == "tsv" else ""
        if fmt == "csv" and quoting != "none":
            hint = '; quote a text that holds commas as "..."'
    elif fmt == "jsonl":
        hint = "; JSONL needs one JSON object per line"
    return DataError(f"{path}: malformed {fmt.upper()}: {msg.strip()}{hint}")


def read_rows(
    path: str | Path, fmt: str = "auto", encoding: str = "utf-8", quoting: str = "csv"
) -> list[Row]:
    """Read a TSV/CSV (header row), JSONL, Parquet or Arrow file into ``(where, row)`` pairs.

    Parsing is Hugging Face ``datasets`` (pandas for TSV/CSV, Arrow for the rest). ``quoting``
    ("csv" or "none", see ``DataConfig``) applies to TSV/CSV only; ``where`` is "row N", the
    Nth record after the header, since a quoted text may span several lines. A path
    ``hub:NAME[@SPLIT]`` loads a data set from the Hugging Face hub instead (when one is
    reachable).
    """
    if str(path).startswith(HUB):
        try:
            return _rows(_load(str(path), "", {}))
        except Exception as e:  # no hub, no such data set: one line, not a traceback
            raise DataError(f"{path}: cannot load from the hub: {e}") from None
    p = Path(path).expanduser()
    fmt = detect_format(p, fmt)
    if not p.is_file():
        what = "is a directory, not a file" if p.is_dir() else "file not found"
        raise DataError(f"{what}: {p}")
    # datasets gives no reason for a JSONL file of blank lines (a large file is not one)
    if fmt == "jsonl" and p.stat().st_size < 1 << 16 and not p.read_bytes().strip():
        raise DataError(f"{p}: file is empty (expected one JSON object per line)")
    try:
        ds = _load(str(p), fmt, _builder_kwargs(fmt, encoding, quoting))
    except Exception as e:
        raise _read_error(p, fmt, quoting, e) from None
    return _rows(ds)


def _rows(ds: Any) -> list[Row]:
    return [(f"row {i}", row) for i, row in enumerate(ds.to_list(), 1)]


def read_records(records: Records) -> list[Row]:
    """Rows from any iterable of mappings (a list of dicts, a ``datasets.Dataset``...)."""
    rows: list[Row] = []
    for i, item in enumerate(records, 1):
        if not isinstance(item, Mapping):
            raise DataError(
                f"record {i} is a {type(item).__name__}, expected a mapping of column to value"
            )
        rows.append((f"record {i}", dict(item)))
    return rows


def _read(path: str, cfg: DataConfig) -> list[Row]:
    return read_rows(path, cfg.format, cfg.encoding, cfg.quoting)


def _columns_at(path: str | Path, where: str, cfg: DataConfig) -> str:
    # A table's missing column is fixed in its header, so point there rather than at a row.
    if str(path) == RECORDS or str(path).startswith(HUB):
        return where
    return "the header" if detect_format(path, cfg.format) in ("tsv", "csv") else where


def _column(path: str | Path, where: str, row: dict[str, Any], field: str, cfg: DataConfig) -> Any:
    name = getattr(cfg, field)
    if name not in row:
        raise DataError(
            f"{path}: {_columns_at(path, where, cfg)} has columns {list(row)}; "
            f"expected {name!r} (set {_FLAGS[field]})"
        )
    return row[name]


def _as_str(path: str | Path, where: str, value: Any, column: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral | numbers.Real) and not isinstance(value, bool):
        return str(value.item() if hasattr(value, "item") else value)  # numpy scalars too
    raise DataError(
        f"{path}: {where}: column {column!r} holds a {type(value).__name__}, expected a string"
    )


def _sorted_labels(values: set[str]) -> tuple[str, ...]:
    # Integer labels sort as numbers ("2" before "10") so class ids follow their values.
    try:
        return tuple(sorted(values, key=lambda v: (int(v), v)))
    except ValueError:
        return tuple(sorted(values))


def _raw_label(path: str | Path, where: str, row: dict[str, Any], cfg: DataConfig) -> str:
    value = _as_str(path, where, _column(path, where, row, "label_column", cfg), cfg.label_column)
    if not value.strip():
        raise DataError(f"{path}: {where} has an empty label in column {cfg.label_column!r}")
    return value.strip()


def infer_labels(path: str | Path, rows: Sequence[Row], cfg: DataConfig) -> tuple[str, ...]:
    """Sorted unique label values of ``rows`` (numerically when all are integers)."""
    found = {_raw_label(path, where, row, cfg) for where, row in rows}
    if not found:
        raise DataError(f"{path}: no rows to infer labels from")
    return _sorted_labels(found)


def _check_verbalizers(cfg: DataConfig, labels: tuple[str, ...]) -> None:
    check(
        not cfg.verbalizers or len(cfg.verbalizers) == len(labels),
        f"DataConfig.verbalizers has {len(cfg.verbalizers)} entries but the data has "
        f"{len(labels)} labels {list(labels)}; give one verbalizer per label",
    )


def _train_path(cfg: DataConfig) -> str:
    check(bool(cfg.train_path), "DataConfig.train_path is empty; set --train-file or --data")
    return cfg.train_path


def _labels_path(cfg: DataConfig) -> str:
    # Labels are inferred from the train file; evaluating a file on its own (no train file)
    # infers them from that file, so `mobillm eval --eval-file f` needs nothing else.
    return cfg.eval_path if cfg.eval_path and not cfg.train_path else _train_path(cfg)


def resolve_labels(cfg: DataConfig, records: Records | None = None) -> tuple[str, ...]:
    """Label names in class-id order: ``cfg.labels``, else inferred from the data.

    They are inferred from ``records`` when given, else from the train file or, when there is
    none (evaluation alone), from the eval file, in the sorted order ``infer_labels`` gives.
    """
    cfg = resolve_preset(cfg)
    if cfg.labels:
        return cfg.labels
    if records is not None:
        labels = infer_labels(RECORDS, read_records(records), cfg)
        _check_verbalizers(cfg, labels)
        return labels
    path = _labels_path(cfg)
    labels = infer_labels(path, _read(path, cfg), cfg)
    _check_verbalizers(cfg, labels)
    return labels


def rows_to_examples(
    path: str | Path, rows: Sequence[Row], cfg: DataConfig, labels: tuple[str, ...] = ()
) -> tuple[list[Example], int]:
    """Turn rows into examples for ``cfg.task``; returns (examples, rows skipped as empty).

    Classification texts are stripped (SST-2 sentences end in a space that would otherwise
    become a token before the template's cue); causal-LM texts are kept verbatim.
    """
    ids = {name: i for i, name in enumerate(labels)}
    out: list[Example] = []
    skipped = 0
    for where, row in rows:
        if cfg.task == "classification":
            raw = _column(path, where, row, "text_column", cfg)
            text = _as_str(path, where, raw, cfg.text_column).strip()
            label = _raw_label(path, where, row, cfg)
            if label not in ids:
                raise DataError(
                    f"{path}: {where} has label {label!r}, which is not one of the known "
                    f"labels {list(labels)} (set --labels, or fix the file)"
                )
            if not text:
                skipped += 1
                continue
            out.append(ClassificationExample(text=text, label=ids[label]))
        else:
            if row.get(cfg.response_column) is not None:
                resp = _as_str(path, where, row[cfg.response_column], cfg.response_column)
                prompt = _as_str(path, where, row.get(cfg.prompt_column), cfg.prompt_column)
            elif row.get(cfg.text_column) is not None:
                resp = _as_str(path, where, row[cfg.text_column], cfg.text_column)
                prompt = ""
            else:
                raise DataError(
                    f"{path}: {_columns_at(path, where, cfg)} has columns {list(row)}; "
                    f"expected {cfg.response_column!r} (with optional {cfg.prompt_column!r}) "
                    f"or {cfg.text_column!r} "
                    "(set --response-column / --prompt-column / --text-column)"
                )
            if not resp.strip():
                skipped += 1
                continue
            out.append(LMExample(prompt=prompt, response=resp))
    return out, skipped


def _build(
    path: str, rows: Sequence[Row], cfg: DataConfig, labels: tuple[str, ...]
) -> list[Example]:
    examples, skipped = rows_to_examples(path, rows, cfg, labels)
    if skipped:
        log.warning("%s: skipped %d row(s) with empty text", path, skipped)
    if not examples:
        extra = f" ({skipped} row(s) with empty text skipped)" if skipped else ""
        raise DataError(f"{path}: no examples in the file{extra}")
    return examples


def _holdout(n: int, fraction: float, seed: int, path: str) -> set[int]:
    n_eval = max(1, round(n * fraction))
    if n_eval >= n:
        raise DataError(
            f"{path}: {n} example(s) is too few to hold out eval_fraction={fraction}; "
            "lower --eval-fraction or give --eval-file"
        )
    return set(random.Random(f"holdout:{seed}").sample(range(n), n_eval))


def load_examples(cfg: DataConfig, split: str, records: Records | None = None) -> list[Example]:
    """Examples of ``split`` ("train" or "eval") in a deterministic order given ``cfg.seed``.

    ``records`` (any iterable of mappings, e.g. a list of dicts or a ``datasets.Dataset``) are
    the split's data instead of a file; columns, labels and ``max_*_samples`` apply as to a
    file, and labels not in ``cfg.labels`` are inferred from the records themselves.

    Applies the preset, then for "eval" reads ``eval_path`` or, if that is empty, the seeded
    ``eval_fraction`` hold-out of the train file (the train split excludes it). Returns [] for
    "eval" when neither is set. An eval file needs no train file: labels come from
    ``cfg.labels``, the train file if there is one, or the eval file itself. With
    ``max_*_samples`` > 0 the split is shuffled (seeded) and cut to its first N examples;
    otherwise file order is kept.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    cfg = resolve_preset(cfg)
    if records is not None:
        rows = read_records(records)
        labels = (
            resolve_labels(cfg, records=(r for _, r in rows))
            if cfg.task == "classification"
            else ()
        )
        return _limit(_build(RECORDS, rows, cfg, labels), cfg, split)
    if split == "eval" and not cfg.eval_path and cfg.eval_fraction == 0.0:
        return []
    path = cfg.eval_path if split == "eval" and cfg.eval_path else _train_path(cfg)
    rows: list[Row] | None = None
    labels: tuple[str, ...] = ()
    if cfg.task == "classification":
        labels = cfg.labels
        if not labels:
            source = _labels_path(cfg)
            source_rows = _read(source, cfg)
            labels = infer_labels(source, source_rows, cfg)
            _check_verbalizers(cfg, labels)
            rows = source_rows if source == path else None

    examples = _build(path, rows if rows is not None else _read(path, cfg), cfg, labels)
    if not cfg.eval_path and cfg.eval_fraction > 0.0:  # then ``path`` is the train file
        held = _holdout(len(examples), cfg.eval_fraction, cfg.seed, path)
        keep = split == "eval"
        examples = [ex for i, ex in enumerate(examples) if (i in held) == keep]
    return _limit(examples, cfg, split)


def _limit(examples: list[Example], cfg: DataConfig, split: str) -> list[Example]:
    """The seeded first ``max_*_samples`` of ``examples`` (all of them, in order, when 0)."""
    limit = cfg.max_train_samples if split == "train" else cfg.max_eval_samples
    if limit:
        order = list(range(len(examples)))
        random.Random(f"{split}:{cfg.seed}").shuffle(order)
        examples = [examples[i] for i in order[:limit]]
    return examples


def hold_out(
    examples: list[Example], fraction: float, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """Split off a seeded ``fraction`` of ``examples`` (at least one, if any is asked for).

    Returns ``(rest, held)``, each in its original order. Training uses it for the validation
    split the server scores after every epoch, taken out of the same sample budget.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    k = min(len(examples) - 1, max(1, round(len(examples) * fraction))) if fraction else 0
    if k <= 0:
        return list(examples), []
    order = list(range(len(examples)))
    random.Random(f"validation:{seed}").shuffle(order)
    held = set(order[:k])
    rest = [ex for i, ex in enumerate(examples) if i not in held]
    return rest, [ex for i, ex in enumerate(examples) if i in held]
