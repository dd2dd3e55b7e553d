"""Who may open a session: API keys (salted hashes on the server), quotas per credential."""

import json

import pytest

from mobillm.errors import ConfigError
from mobillm.server.auth import ApiKeys, add_key
from mobillm.transport.grpc_client import GrpcTransport
from mobillm.transport.messages import RemoteError


def test_key_file_holds_no_usable_key(tmp_path):
    path = tmp_path / "keys"
    alice, bob = add_key(path, "alice"), add_key(path, "bob@lab")
    text = path.read_text()
    # the secret is everything after mk_<id>_ (url-safe base64: it may hold "_" itself)
    assert alice not in text and alice.split("_", 2)[2] not in text
    assert (path.stat().st_mode & 0o777) == 0o600
    keys = ApiKeys.load(path)
    assert len(keys) == 2 and keys.check(alice) == "alice" and keys.check(bob) == "bob@lab"
    kid = alice.split("_")[1]
    for wrong in ("", "alice", alice + "x", f"mk_{kid}_", f"mk_{kid}_" + "a" * 500, bob[:-1]):
        assert keys.check(wrong) is None, wrong
    with pytest.raises(ConfigError, match="use 1-64 letters"):
        add_key(path, "no spaces")
    (tmp_path / "bad").write_text("alice plaintext-key\n")
    with pytest.raises(ConfigError, match="bad:1: expected"):
        ApiKeys.load(tmp_path / "bad")
    (tmp_path / "empty").write_text("# nobody yet\n")
    with pytest.raises(ConfigError, match="holds no API keys"):
        ApiKeys.load(tmp_path / "empty")


def test_only_credentials_open_sessions(tmp_path, make_tiny_backbone, session_spec, start_server):
    keys = tmp_path / "keys"
    alice, bob = add_key(keys, "alice"), add_key(keys, "bob")
    server = start_server(open_access=False, api_keys_file=str(keys), max_sessions_per_client=1)
    target = f"127.0.0.1:{server.port}"
    spec, _ = session_spec(make_tiny_backbone("llama"))

    def open_with(key):
        t = GrpcTransport(target, api_key=key)
        try:
            return t.open(spec)
        finally:
            t.shutdown()

    for key, why in (("", "only for a credential"), ("mk_0_x", "not accepted"), (alice + "1", "")):
        with pytest.raises(RemoteError) as e:
            open_with(key)
        assert e.value.code == "UNAUTHENTICATED" and why in e.value.message
    assert open_with(alice).session_id
    with pytest.raises(RemoteError) as e:  # alice's quota is one session
        open_with(alice)
    assert e.value.code == "RESOURCE_EXHAUSTED" and "key:alice" in e.value.message
    assert open_with(bob).session_id  # bob has his own
    lines = (tmp_path / "server0" / "server.jsonl").read_text().splitlines()
    events = [json.loads(x) for x in lines]
    assert [e["client"] for e in events if e["event"] == "open"] == ["key:alice", "key:bob"]
    refused = [e for e in events if e["event"] == "refuse"]
    assert [e["code"] for e in refused] == ["UNAUTHENTICATED"] * 3 + ["RESOURCE_EXHAUSTED"]
