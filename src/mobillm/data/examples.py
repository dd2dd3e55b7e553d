"""Example records produced by the readers, and the data error users see."""

from __future__ import annotations

import dataclasses

from mobillm.errors import MobiLLMError


class DataError(MobiLLMError):
    """A data file is missing, unreadable or malformed; the message names file and line."""


@dataclasses.dataclass(frozen=True)
class ClassificationExample:
    """One labelled text; ``label`` is the class id, an index into ``DataConfig.labels``."""

    text: str
    label: int


@dataclasses.dataclass(frozen=True)
class LMExample:
    """One causal-LM example; the loss covers ``response`` only (``prompt`` "" = plain text)."""

    prompt: str
    response: str


Example = ClassificationExample | LMExample
