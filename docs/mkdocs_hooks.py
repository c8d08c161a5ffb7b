"""mkdocs hooks (see `mkdocs.yml`): serve the repository README as the site's home page.

mkdocs only reads `docs_dir`, and the README must stay at the repository root for GitHub; so the hook adds it to
the site's files and rewrites the links that are relative to its real place (`docs/x.md` from the README,
`../README.md` from the pages).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.structure.files import File

README = Path(__file__).resolve().parents[1] / "README.md"


def on_files(files: Any, config: Any) -> Any:
    """Add the README; mkdocs serves a `README.md` at the top of the site as its index page."""
    files.append(File.generated(config, "README.md", abs_src_path=str(README)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Links written for GitHub's file layout, made relative to the site's layout."""
    if page.file.src_uri == "README.md":
        return markdown.replace("](docs/", "](")
    return markdown.replace("](../README.md", "](README.md")
