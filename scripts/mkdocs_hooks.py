"""MkDocs hooks: the docs link to figures, the .proto and JSON Schemas outside docs/ (so the
links also work on GitHub); the site serves those files and rewrites the links to them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
# folder at the repository root -> file patterns the site publishes from it
SHARED = {"results": "**/*.png", "proto": "**/*.proto", "schema": "*.json"}
LINK = re.compile(r"\]\(\.\./(" + "|".join(SHARED) + r")/")


def on_files(files: Files, config: Any) -> Files:
    for folder, pattern in SHARED.items():
        for path in sorted((ROOT / folder).glob(pattern)):
            uri = path.relative_to(ROOT).as_posix()
            files.append(File(uri, str(ROOT), config["site_dir"], config["use_directory_urls"]))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    # "../results/x.png" from a top-level page is "results/x.png" in the site
    depth = page.file.src_uri.count("/")
    return LINK.sub(lambda m: "](" + "../" * depth + m.group(1) + "/", markdown)
