"""Tokenise examples once into id lists (`TokenizedDataset`) so epochs never re-tokenise.

Classification: ``template.format(text=...)`` with the *text* truncated so the template's cue
(e.g. "\\nSentiment:") always ends the sequence. Causal LM: ``prompt + "\\n"`` (with the
tokenizer's usual special tokens) followed by ``response`` and EOS; truncation keeps the prompt
and cuts the response tail.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from mobillm.data.config import DataConfig, resolve_preset
from mobillm.data.examples import ClassificationExample, DataError, Example, LMExample

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TokenizedDataset:
    """Token id lists for one split; ``input_ids[i]`` is example i, unpadded, at most max_length.

    Classification sets ``labels`` (class ids); causal LM sets ``response_starts`` (index of the
    first response token in ``input_ids[i]``: tokens before it are prompt and carry no loss).
    """

    task: str
    input_ids: list[list[int]]
    pad_id: int
    labels: list[int] | None = None
    response_starts: list[int] | None = None
    truncated: int = 0  # examples cut to max_length
    dropped: int = 0  # causal-LM examples left with no response token to predict

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id used for right padding: the pad token, else EOS (Llama-family tokenizers)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    raise DataError("the tokenizer has neither a pad nor an eos token; cannot pad batches")


def _ids(tokenizer: PreTrainedTokenizerBase, text: str | list[str], special: bool) -> list:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def _fit_text(
    tokenizer: PreTrainedTokenizerBase, template: str, text: str, max_len: int
) -> list[int]:
    """Ids of ``template`` around the longest head of ``text`` that fits in ``max_len`` tokens.

    Cuts the text at token boundaries (character offsets when the tokenizer gives them) and
    re-tokenises the whole prompt, because tokens merge across the text/template seam; repeats
    until it fits (usually once).
    """
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ends = [end for _, end in enc["offset_mapping"]]
        text_ids = enc["input_ids"]
    except (NotImplementedError, ValueError, TypeError, KeyError):
        text_ids, ends = _ids(tokenizer, text, False), None
    keep = len(text_ids)
    ids = _ids(tokenizer, template.format(text=text), True)
    while len(ids) > max_len:
        keep -= len(ids) - max_len
        if keep <= 0:
            return _ids(tokenizer, template.format(text=""), True)
        head = text[: ends[keep - 1]] if ends is not None else tokenizer.decode(text_ids[:keep])
        ids = _ids(tokenizer, template.format(text=head.rstrip()), True)
    return ids


def _classification(
    examples: Sequence[ClassificationExample], tokenizer: PreTrainedTokenizerBase, cfg: DataConfig
) -> TokenizedDataset:
    bare = _ids(tokenizer, cfg.template.format(text=""), True)
    if len(bare) >= cfg.max_length:
        raise DataError(
            f"the template {cfg.template!r} alone is {len(bare)} tokens, leaving no room for text "
            f"within max_length={cfg.max_length}; raise --max-length or shorten the template"
        )
    prompts = [cfg.template.format(text=ex.text) for ex in examples]
    all_ids = _ids(tokenizer, prompts, True) if prompts else []
    truncated = 0
    for i, ids in enumerate(all_ids):
        if len(ids) > cfg.max_length:
            all_ids[i] = _fit_text(tokenizer, cfg.template, examples[i].text, cfg.max_length)
            truncated += 1
    return TokenizedDataset(
        task="classification",
        input_ids=[list(ids) for ids in all_ids],
        pad_id=pad_token_id(tokenizer),
        labels=[ex.label for ex in examples],
        truncated=truncated,
    )


def _causal_lm(
    examples: Sequence[LMExample], tokenizer: PreTrainedTokenizerBase, cfg: DataConfig
) -> TokenizedDataset:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError(
            "the tokenizer has no eos token; causal-LM tuning needs one to end responses"
        )
    # Special tokens (BOS) belong to the prompt part only, so a plain-text row still starts with
    # BOS when the tokenizer normally adds one; the "\n" separates prompt from response.
    prompts = [ex.prompt + "\n" if ex.prompt else "" for ex in examples]
    prompt_ids = _ids(tokenizer, prompts, True) if prompts else []
    resp_ids = _ids(tokenizer, [ex.response for ex in examples], False) if examples else []
    input_ids: list[list[int]] = []
    starts: list[int] = []
    truncated = dropped = 0
    for p, r in zip(prompt_ids, resp_ids, strict=True):
        r = [*r, eos]
        if len(p) + len(r) > cfg.max_length:
            r = r[: max(0, cfg.max_length - len(p))]
            truncated += 1
        # Position t predicts token t+1, so the first token of a sequence is never a target.
        if (len(r) if p else len(r) - 1) < 1:
            dropped += 1
            continue
        input_ids.append([*p, *r])
        starts.append(len(p))
    if dropped:
        log.warning(
            "dropped %d example(s) whose prompt leaves no response token within max_length=%d",
            dropped,
            cfg.max_length,
        )
    return TokenizedDataset(
        task="causal_lm",
        input_ids=input_ids,
        pad_id=pad_token_id(tokenizer),
        response_starts=starts,
        truncated=truncated,
        dropped=dropped,
    )


def tokenize_examples(
    examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, cfg: DataConfig
) -> TokenizedDataset:
    """Tokenise ``examples`` for ``cfg.task`` (each at most ``cfg.max_length`` tokens)."""
    cfg = resolve_preset(cfg, paths=False)  # the preset's template applies here too
    want = ClassificationExample if cfg.task == "classification" else LMExample
    wrong = next((ex for ex in examples if not isinstance(ex, want)), None)
    if wrong is not None:
        raise DataError(
            f"task {cfg.task!r} needs {want.__name__} items, got {type(wrong).__name__}"
        )
    if cfg.task == "classification":
        out = _classification(examples, tokenizer, cfg)  # type: ignore[arg-type]
    else:
        out = _causal_lm(examples, tokenizer, cfg)  # type: ignore[arg-type]
    if out.truncated:
        log.info(
            "truncated %d of %d example(s) to max_length=%d",
            out.truncated,
            len(examples),
            cfg.max_length,
        )
    return out
