"""The documentation stays true to the code. Cheap: no model is loaded, nothing is drawn.

- `docs/api.md` names every public object and lists every config field with the type, default and description the
  code has (regenerate with `docs/make_api.py`);
- every relative link (and in-page anchor) of README.md and docs/*.md resolves;
- the attention mask the figure script draws is the mask the CPU kernel computes;
- `mkdocs.yml` is valid YAML whose nav points at existing pages.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import yaml

import trl_prefix_share

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
REGENERATE = "run `OMP_NUM_THREADS=1 .venv/bin/python docs/make_api.py` and commit docs/api.md"


def load_script(name: str) -> ModuleType:
    """A script of docs/ (not a package) as a module."""
    spec = importlib.util.spec_from_file_location(f"docs_{name}", DOCS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def make_api() -> ModuleType:
    return load_script("make_api")


@pytest.fixture(scope="module")
def api_sections() -> dict[str, str]:
    """The text under each `### \\`name\\`` heading of docs/api.md."""
    text = (DOCS / "api.md").read_text(encoding="utf-8")
    parts = re.split(r"^### `([^`]+)`$", text, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_api_reference_names_every_public_object(api_sections):
    missing = [name for name in trl_prefix_share.__all__ if name not in api_sections]
    assert not missing, f"docs/api.md lacks {missing}: {REGENERATE}"


def test_api_reference_lists_every_config_field_as_the_code_has_it(make_api, api_sections):
    objects = make_api.public_objects()
    configs = {name: obj for name, obj in objects.items() if inspect.isclass(obj) and dataclasses.is_dataclass(obj)}
    assert {"PrefixShareArguments", "StepwiseDPOConfig", "PrefixSharedDPOConfig"} <= set(configs)
    stale = [
        f"{name}.{field.name}"
        for name, config in configs.items()
        for field in make_api.added_fields(config)
        if make_api.field_row(config, field, list(objects)) not in api_sections.get(name, "")
    ]
    assert not stale, f"docs/api.md is missing or out of date for {stale}: {REGENERATE}"


def test_our_trl_configs_add_exactly_the_prefix_sharing_fields(make_api):
    expected = {field.name for field in dataclasses.fields(trl_prefix_share.PrefixShareArguments)}
    objects = make_api.public_objects()
    for kind in ("DPO", "Reward", "ORPO", "CPO"):
        config = objects[f"PrefixShared{kind}Config"]
        assert {field.name for field in make_api.added_fields(config)} == expected, kind


# -- links -------------------------------------------------------------------------------------------------------------

_FENCED = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def links(text: str) -> list[str]:
    """Link and image targets outside code blocks and code spans."""
    text = _FENCED.sub("", text)
    text = re.sub(r"`[^`\n]*`", "", text)
    return _LINK.findall(text)


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors of a markdown file's headings (lower case, punctuation dropped, spaces to hyphens)."""
    text = _FENCED.sub("", path.read_text(encoding="utf-8"))
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*$", text, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("page", markdown_files(), ids=lambda path: path.name)
def test_relative_links_resolve(page):
    broken = []
    for target in links(page.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, fragment = target.partition("#")
        destination = (page.parent / file_part).resolve() if file_part else page
        exists = destination.exists()
        anchored = not fragment or destination.suffix != ".md" or (exists and fragment in heading_anchors(destination))
        if not (exists and anchored):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)} has broken links: {broken}"


# -- the figure --------------------------------------------------------------------------------------------------------


def test_figure_mask_is_the_kernel_mask_and_follows_the_rule(tokenizer):
    figures = load_script("make_figures")
    example = figures.build_example(tokenizer)
    mask = figures.checked_mask(example)  # raises when the layout rule and the SDPA kernel's groups disagree
    roles = example.roles
    document = example.packed["document_ids"][0]
    real = document >= 0
    assert {"prompt", "chosen", "rejected", "both", "pad"} == set(roles)
    assert bool(mask[real][:, real].diagonal().all()), "every real token sees itself"
    assert not bool(mask[~real].any() or mask[:, ~real].any()), "padding takes no part"
    assert not bool((mask & (document[:, None] != document[None, :])).any()), "documents never see each other"
    rejected = torch.tensor([role == "rejected" for role in roles])
    chosen = torch.tensor([role == "chosen" for role in roles])
    prompt = torch.tensor([role == "prompt" for role in roles])
    assert not bool(mask[rejected][:, chosen].any()), "the rejected branch never sees the chosen one"
    same_doc_prompt = prompt[None, :] & (document[:, None] == document[None, :])
    assert bool((mask | ~same_doc_prompt)[rejected].all()), "the rejected branch sees its whole prompt"


def test_committed_figure_is_a_small_png():
    figure = DOCS / "packed_layout.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert figure.stat().st_size < 300_000


# -- mkdocs ------------------------------------------------------------------------------------------------------------


def nav_pages(nav: list) -> list[str]:
    pages: list[str] = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        if isinstance(value, list):
            pages += nav_pages(value)
        elif not re.match(r"^[a-z]+://", value):
            pages.append(value)
    return pages


def test_mkdocs_nav_points_at_existing_pages():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    docs_dir = ROOT / config.get("docs_dir", "docs")
    pages = nav_pages(config["nav"])
    missing = [page for page in pages if not (docs_dir / page).exists() and not (ROOT / page).exists()]
    assert pages and not missing, missing
