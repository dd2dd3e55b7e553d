"""The checked-in protobuf code is exactly what the .proto generates, and only serde uses it."""

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _gen_proto():
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generated_code_matches_the_proto(tmp_path):
    gen = _gen_proto()
    fresh = gen.generate(tmp_path)
    assert fresh == gen.generated(ROOT / "src"), "generated files differ from the checked-in set"
    for rel in fresh:
        assert (tmp_path / rel).read_bytes() == (ROOT / "src" / rel).read_bytes(), (
            f"{rel} drifted from proto/: run `python scripts/gen_proto.py`"
        )
    # the generator only ever writes inside the generated package
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert written == fresh
    assert gen.drift() == []


def test_generated_stub_imports_by_its_package_path():
    stub = (ROOT / "src/mobillm/proto/v1/mobillm_pb2_grpc.py").read_text()
    assert "from mobillm.proto.v1 import mobillm_pb2" in stub
    from mobillm.proto.v1 import mobillm_pb2, mobillm_pb2_grpc

    assert mobillm_pb2.DESCRIPTOR.package == "mobillm.v1"
    assert mobillm_pb2_grpc.SideTuningStub is not None


def test_only_serde_imports_the_message_code():
    """One conversion boundary: messages in serde; the service stubs in the gRPC client/server."""
    users: dict[str, set[str]] = {"mobillm_pb2": set(), "mobillm_pb2_grpc": set()}
    for path in (ROOT / "src/mobillm").rglob("*.py"):
        if "proto" in path.relative_to(ROOT / "src/mobillm").parts[:1]:
            continue
        text = path.read_text()
        for mod in users:
            if re.search(rf"\b{mod}\b", text):
                users[mod].add(path.name)
    assert users["mobillm_pb2"] == {"serde.py"}
    assert users["mobillm_pb2_grpc"] == {"grpc_client.py", "grpc_server.py"}
