"""The docs site builds with MkDocs in strict mode: a broken link, a missing page or an API
reference entry that does not resolve fails the suite, as it would fail CI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_docs_site_builds_without_warnings(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WARNING" not in proc.stderr, proc.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    for name in ("mobillm.Device", "mobillm.Server", "mobillm.DataConfig", "train", "evaluate"):
        assert name in api, f"{name} missing from the API reference"
    assert (tmp_path / "site" / "schema" / "side_meta.schema.json").is_file()
