"""JSON Schemas of the two payloads that travel as JSON, generated from the dataclasses.

``OpenSessionRequest.spec_json`` carries a ``SessionSpec`` as its config dataclasses write it
(``schema/session_spec.schema.json``); ``WeightsChunk.meta_json`` carries ``side.json``, the
saved side network's metadata (``schema/side_meta.schema.json``). A device written in another
language builds and reads them from these files, which are generated here from the
dataclasses themselves (types, defaults, the docstrings as descriptions) and checked for drift
by a test, like the protobuf code. Range checks that span
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
from mobillm.data.config import TASK_FIELDS, DataConfig
from mobillm.fingerprint import BackboneFingerprint
from mobillm.side.config import SideConfig
from mobillm.side.io import FORMAT as SIDE_FORMAT
from mobillm.side.io import SideMeta
from mobillm.transport.messages import SessionSpec

SCHEMA_DIR = Path("schema")
SCHEMA_PATH = SCHEMA_DIR / "session_spec.schema.json"
SIDE_META_PATH = SCHEMA_DIR / "side_meta.schema.json"
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


def side_meta_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of ``side.json`` as ``meta_json`` carries it."""
    defs: dict[str, Any] = {}
    data = _object(DataConfig, {})
    data["properties"] = {k: v for k, v in data["properties"].items() if k in TASK_FIELDS}
    data["description"] = (
        "The device's task, added by the device after the download: what it needs to read, "
        "template and label data later (a subset of DataConfig). The server leaves it empty."
    )
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://mobillm.dev/schema/side_meta.schema.json",
        "title": "SideMeta",
        "type": "object",
        "description": inspect.cleandoc(SideMeta.__doc__ or "SideMeta"),
        "properties": {
            "format": {"const": SIDE_FORMAT, "description": "side.json format version"},
            "side": _type(SideConfig, defs),
            "fingerprint": _type(BackboneFingerprint, defs),
            "taps": {
                "type": "array",
                "items": {"type": "integer", "minimum": 0},
                "description": "backbone layers the side network reads, in order",
            },
            "task": {
                "type": "object",
                "properties": {"data": data},
                "description": "the device's task metadata (free-form beyond 'data')",
            },
        },
        "required": ["format", "side", "fingerprint", "taps"],
        "additionalProperties": False,
        "$defs": defs,
    }


SCHEMAS = {SCHEMA_PATH: session_spec_schema, SIDE_META_PATH: side_meta_schema}


def schema_text(path: Path = SCHEMA_PATH) -> str:
    """The text of the schema file ``path`` (one of ``SCHEMAS``), as checked in."""
    return json.dumps(SCHEMAS[path](), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":  # python -m mobillm.transport.schema: rewrite the checked-in files
    SCHEMA_DIR.mkdir(parents=True, exist_ok=True)
    for schema_path in SCHEMAS:
        schema_path.write_text(schema_text(schema_path))
        print(f"wrote {schema_path}")
