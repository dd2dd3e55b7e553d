"""The README quickstart and every script in examples/, run as a user would (own process,
own working folder), on a tiny model saved as a folder."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def code_lines(source: str) -> int:
    """Lines of code: no blank lines, comments or the module docstring."""
    tree = ast.parse(source)
    doc = ast.get_docstring(tree)
    body = source
    if doc is not None:
        node = tree.body[0]
        lines = source.splitlines()
        body = "\n".join(lines[: node.lineno - 1] + lines[node.end_lineno :])
    return sum(1 for ln in body.splitlines() if ln.strip() and not ln.strip().startswith("#"))


def readme_quickstart() -> str:
    text = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- quickstart[^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert found, "README has no quickstart block"
    return found.group(1)


def run(tmp_path: Path, *argv: str) -> str:
    proc = subprocess.run(
        [sys.executable, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_readme_quickstart_runs_and_is_short(tmp_path, model_dir):
    code = readme_quickstart()
    assert code_lines(code) <= 10
    assert '"smollm2-135m"' in code
    script = tmp_path / "quickstart.py"
    script.write_text(code.replace('"smollm2-135m"', repr(model_dir)))
    out = run(tmp_path, str(script))
    assert re.search(r"accuracy \d\.\d{3} -> \d\.\d{3}", out), out
    assert (tmp_path / "runs" / "quickstart-side" / "side.safetensors").is_file()


def test_two_process_example_is_short():
    assert code_lines((ROOT / "examples" / "two_processes.py").read_text()) <= 20


def test_quickstart_example_is_the_readme_block():
    # the README block runs above; the example file is the same code with a model argument
    code = readme_quickstart().replace('mobillm.Device("smollm2-135m")', "mobillm.Device(model)")
    example = (ROOT / "examples" / "quickstart.py").read_text()
    for line in code.splitlines():
        if line.strip() and not line.strip().startswith("#"):
            assert line.split("  #")[0].rstrip() in example, line


RUN = [p for p in EXAMPLES if p.stem != "quickstart"]


@pytest.mark.parametrize("script", RUN, ids=[p.stem for p in RUN])
def test_example_runs(tmp_path, model_dir, script):
    out = run(tmp_path, str(script), model_dir)
    assert re.search(r"accuracy \d\.\d{3} -> \d\.\d{3}", out), out
