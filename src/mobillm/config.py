"""Config base: frozen dataclasses validated where built, round-tripped through JSON."""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Self, TypeVar

from mobillm.errors import ConfigError

T = TypeVar("T", bound="Config")


@dataclasses.dataclass(frozen=True)
class Config:
    """Base for every component config.

    Subclasses are frozen dataclasses whose fields are JSON-friendly (numbers, strings, bools,
    tuples, nested Configs). They check themselves in ``validate`` (called from ``__post_init__``)
    and raise ``ConfigError`` with a message that names the field.
    """

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError if a field is out of range; subclasses extend this."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Config):
                v = v.to_dict()
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown field(s) {unknown}; known: {sorted(names)}")
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            kwargs[name] = _coerce(hints[name], value, f"{cls.__name__}.{name}")
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise ConfigError(f"{cls.__name__}: {e}") from None

    @classmethod
    def from_json(cls, text: str) -> Self:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{cls.__name__}: invalid JSON: {e}") from None
        except RecursionError:
            raise ConfigError(f"{cls.__name__}: JSON nested too deeply") from None
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Self:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{cls.__name__}: config file not found: {p}")
        return cls.from_json(p.read_text())

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)


_SCALARS: dict[type, tuple[type, ...]] = {
    int: (int,),
    float: (int, float),
    str: (str,),
    bool: (bool,),
}


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Turn JSON values back into the declared field type (nested configs, tuples)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        if len(args) == 1:
            return _coerce(args[0], value, where)
        return value
    if isinstance(tp, type) and issubclass(tp, Config):
        return tp.from_dict(value)
    if tp in _SCALARS:
        ok = isinstance(value, _SCALARS[tp]) and (tp is bool or not isinstance(value, bool))
        if not ok:
            raise ConfigError(
                f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}"
            )
        if tp is float and not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value) if tp is float else value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        return tuple(_coerce(inner, v, where) for v in value)
    return value


def check(cond: bool, msg: str) -> None:
    """Raise ConfigError(msg) unless cond holds; configs use this in ``validate``."""
    if not cond:
        raise ConfigError(msg)
