"""The JSON Schema of the session spec, the one message that travels as JSON.

``OpenSessionRequest.spec_json`` carries a ``SessionSpec`` as its config dataclasses write it.
A device written in another language builds it from ``schema/session_spec.schema.json``, which
is generated here from the dataclasses themselves (types, defaults, the docstrings as
descriptions) and checked for drift by a test, like the protobuf code. Range checks that span
fields (taps within the layer count, one verbalizer per label) live in the dataclasses'
``validate``; the schema says so in each description and the server answers INVALID_ARGUMENT
with the precise reason.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import typing
from pathlib import Path
from typing import Any

from mobillm.config import Config
from mobillm.transport.messages import SessionSpec

SCHEMA_PATH = Path("schema") / "session_spec.schema.json"
_SCALARS = {int: "integer", float: "number", str: "string", bool: "boolean"}


def _type(tp: Any, defs: dict[str, Any]) -> dict[str, Any]:
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and issubclass(tp, Config):
        if tp.__name__ not in defs:
            defs[tp.__name__] = {}  # placeholder: a config may refer to itself
            defs[tp.__name__] = _object(tp, defs)
        return {"$ref": f"#/$defs/{tp.__name__}"}
    if tp in _SCALARS:
        return {"type": _SCALARS[tp]}
    if origin is tuple:
        args = typing.get_args(tp)
        return {"type": "array", "items": _type(args[0], defs) if args else {}}
    raise TypeError(f"no JSON Schema type for {tp!r}")


def _object(cls: type[Config], defs: dict[str, Any]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    props: dict[str, Any] = {}
    required = []
    for f in dataclasses.fields(cls):
        prop = _type(hints[f.name], defs)
        if f.default is not dataclasses.MISSING:
            default = f.default
            prop["default"] = list(default) if isinstance(default, tuple) else default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
            prop["default"] = value.to_dict() if isinstance(value, Config) else value
        else:
            required.append(f.name)
        props[f.name] = prop
    out: dict[str, Any] = {
        "type": "object",
        "description": inspect.cleandoc(cls.__doc__ or cls.__name__),
        "properties": props,
        "additionalProperties": False,
    }
    if required:
        out["required"] = required
    return out


def session_spec_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of ``SessionSpec`` as ``spec_json`` carries it."""
    defs: dict[str, Any] = {}
    root = _object(SessionSpec, defs)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://mobillm.dev/schema/session_spec.schema.json",
        "title": "SessionSpec",
        **root,
        "$defs": defs,
    }


def schema_text() -> str:
    return json.dumps(session_spec_schema(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":  # python -m mobillm.transport.schema: rewrite the checked-in file
    SCHEMA_PATH.parent.mkdir(parents=True, exist_ok=True)
    SCHEMA_PATH.write_text(schema_text())
    print(f"wrote {SCHEMA_PATH}")
