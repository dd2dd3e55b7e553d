"""The published JSON Schema of the session spec: in step with the dataclasses, and what real
devices send validates against it."""

import json
from pathlib import Path

import jsonschema
import pytest

from mobillm.codec import CodecConfig
from mobillm.device.runtime import build_session, build_side_config
from mobillm.transport.messages import TrainConfig
from mobillm.transport.schema import SCHEMA_PATH, SCHEMAS, schema_text

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", list(SCHEMAS), ids=lambda p: p.name)
def test_checked_in_schemas_match_the_dataclasses(path):
    assert (ROOT / path).read_text() == schema_text(path), (
        f"{path} drifted: run `python -m mobillm.transport.schema`"
    )


@pytest.mark.parametrize(
    "task,options,positions",
    [
        ("classification", {}, "loss"),
        ("classification", {"mixer": "attention"}, "valid"),
        ("classification", {"kind": "split", "split_layers": 1}, "valid"),
        ("causal_lm", {}, "loss"),
    ],
)
def test_real_specs_validate(make_tiny_backbone, task, options, positions):
    schema = json.loads((ROOT / SCHEMA_PATH).read_text())
    bb = make_tiny_backbone("llama")
    labels = 2 if task == "classification" else 0
    words = ("bad", "good") if task == "classification" else ()
    side = build_side_config(bb, task, labels, words, **options)
    spec, _ = build_session(bb, side, CodecConfig("int4"), TrainConfig(total_steps=5), positions)
    jsonschema.validate(json.loads(spec.to_json()), schema)
    bad = json.loads(spec.to_json())
    bad["side"]["adapter_ratio"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    bad = json.loads(spec.to_json())
    bad["side"]["unknown"] = 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
