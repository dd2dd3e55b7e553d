"""Who may open a session: API keys stored as salted hashes, or a mutual-TLS client identity.

A key looks like ``mk_<id>_<secret>``. The server's key file holds one line per key::

    <name> <id> <salt hex> <scrypt(secret, salt) hex>

so the file never holds a usable key, the ``id`` picks the one line to check (one scrypt per
OpenSession, not one per stored key), and the comparison runs in constant time. ``name`` is the
credential the server's quotas and its log speak of. ``mobillm serve --add-api-key NAME``
appends a line and prints the key once.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from mobillm.errors import ConfigError

PREFIX = "mk_"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_LINE = re.compile(r"^(\S+) ([0-9a-f]{16}) ([0-9a-f]{32}) ([0-9a-f]{64})$")
# scrypt at a cost that takes a few milliseconds: the secret is 32 random bytes, so the hash
# only has to make a stolen key file useless, not slow down guessing of weak passwords
_SCRYPT = {"n": 1 << 12, "r": 8, "p": 1}


def _hash(secret: str, salt: bytes) -> bytes:
    return hashlib.scrypt(secret.encode(), salt=salt, dklen=32, **_SCRYPT)


@dataclass(frozen=True)
class _Entry:
    name: str
    salt: bytes
    digest: bytes


class ApiKeys:
    """The keys of one key file, by id; ``check(key)`` returns the key's name or None."""

    def __init__(self, entries: dict[str, _Entry]) -> None:
        self._entries = entries

    def __len__(self) -> int:
        return len(self._entries)

    @classmethod
    def load(cls, path: str | Path) -> ApiKeys:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"API key file not found: {p}")
        entries: dict[str, _Entry] = {}
        for n, line in enumerate(p.read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            m = _LINE.match(line)
            if m is None or not _NAME.match(m[1]):
                raise ConfigError(
                    f"{p}:{n}: expected '<name> <id> <salt> <hash>' as written by "
                    "mobillm serve --add-api-key"
                )
            entries[m[2]] = _Entry(m[1], bytes.fromhex(m[3]), bytes.fromhex(m[4]))
        if not entries:
            raise ConfigError(f"{p} holds no API keys; add one with mobillm serve --add-api-key")
        return cls(entries)

    def check(self, key: str) -> str | None:
        """The name of the credential ``key`` belongs to, or None."""
        if not key.startswith(PREFIX):
            return None
        kid, _, secret = key[len(PREFIX) :].partition("_")
        entry = self._entries.get(kid)
        if entry is None or not secret or len(secret) > 128:
            return None
        if not hmac.compare_digest(_hash(secret, entry.salt), entry.digest):
            return None
        return entry.name


def add_key(path: str | Path, name: str) -> str:
    """Append a new key for ``name`` to the key file (created 0600) and return the key."""
    if not _NAME.match(name):
        raise ConfigError(
            f"API key name {name!r}: use 1-64 letters, digits and . _ @ -, starting with a "
            "letter or digit"
        )
    kid, secret, salt = secrets.token_hex(8), secrets.token_urlsafe(32), secrets.token_bytes(16)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.touch(mode=0o600, exist_ok=True)
    with p.open("a", encoding="utf-8") as f:
        f.write(f"{name} {kid} {salt.hex()} {_hash(secret, salt).hex()}\n")
    return f"{PREFIX}{kid}_{secret}"
