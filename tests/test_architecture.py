"""The package's layers: core imports neither trainers nor commands, trainers never import commands, no two modules
import each other (in one layer or across); public imports stay what they were."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import pytest

import trl_prefix_share

DOCS = Path(__file__).resolve().parents[1] / "docs"
#: Every public name as it was before the restructure (the package's `__all__` of release 0.1.0).
PUBLIC_NAMES = {
    "ATTENTION_NAME",
    "GroupByPrompt",
    "GroupedPrefixSharedDPOTrainer",
    "PrefixSharedCPOConfig",
    "PrefixSharedCPOTrainer",
    "PrefixSharedORPOConfig",
    "PrefixSharedORPOTrainer",
    "PrefixSharedRewardConfig",
    "PrefixSharedRewardTrainer",
    "PromptGroupedSampler",
    "StepwiseDPO",
    "StepwiseDPOConfig",
    "PrefixShareArguments",
    "PrefixSharedDPOConfig",
    "PrefixSharedDPOTrainer",
    "PrefixSharedPreferenceCollator",
    "UnsupportedModelError",
    "register_attention",
}


def architecture():
    spec = importlib.util.spec_from_file_location("make_architecture", DOCS / "make_architecture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_imports_only_go_downward():
    tool = architecture()
    edges = tool.layer_imports()
    assert any(tool.layer_of(s) == "trainers" and tool.layer_of(t) == "core" for s, t in edges)  # the check sees edges
    assert tool.upward_imports() == []


def test_every_module_sits_in_a_layer():
    tool = architecture()
    strays = [name for name in tool.package_modules() if name != "trl_prefix_share" and tool.layer_of(name) == "root"]
    assert strays == [], "modules outside core/, trainers/ and commands/"


def test_upward_imports_are_detected(tmp_path, monkeypatch):
    tool = architecture()
    package = tmp_path / "trl_prefix_share"
    (package / "core").mkdir(parents=True)
    (package / "trainers").mkdir()
    (package / "__init__.py").write_text("")
    (package / "core" / "__init__.py").write_text("")
    (package / "trainers" / "__init__.py").write_text("")
    (package / "trainers" / "x.py").write_text("from ..core import y\n")
    (package / "core" / "y.py").write_text("def f():\n    from ..trainers import x\n")
    monkeypatch.setattr(tool, "PACKAGE_DIR", package)
    assert tool.upward_imports() == [("trl_prefix_share.core.y", "trl_prefix_share.trainers")]


def test_no_import_cycles():
    tool = architecture()
    assert any(len(targets) > 1 for targets in tool.import_graph().values())  # the check sees imports
    assert tool.import_cycles() == []


def test_import_cycles_are_detected_inside_a_layer(tmp_path, monkeypatch):
    """A deferred import back (inside a function) is a cycle too: it was how `commands/cli` and `commands/online`
    depended on each other."""
    tool = architecture()
    package = tmp_path / "trl_prefix_share"
    (package / "commands").mkdir(parents=True)
    (package / "core").mkdir()
    for init in (package, package / "commands", package / "core"):
        (init / "__init__.py").write_text("")
    (package / "commands" / "cli.py").write_text("from trl_prefix_share.commands import online\n")
    (package / "commands" / "online.py").write_text("def run():\n    from .steps import parse\n")
    (package / "commands" / "steps.py").write_text("from trl_prefix_share.commands.cli import main\n")
    (package / "core" / "a.py").write_text("from . import b\n")
    (package / "core" / "b.py").write_text("x = 1\n")
    monkeypatch.setattr(tool, "PACKAGE_DIR", package)
    assert tool.upward_imports() == []  # all inside one layer: only the cycle check can see it
    assert tool.import_cycles() == [
        ["trl_prefix_share.commands.cli", "trl_prefix_share.commands.online", "trl_prefix_share.commands.steps"]
    ]


@pytest.mark.parametrize("name", sorted(PUBLIC_NAMES))
def test_public_names_import_from_the_package_root(name):
    assert name in trl_prefix_share.__all__
    assert getattr(importlib.import_module("trl_prefix_share"), name) is not None


def test_the_data_path_names_real_objects():
    tool = architecture()
    for _, dotted in tool.DATA_PATH:
        assert tool.resolve(dotted) is not None


def test_the_how_to_names_real_objects():
    """Every `module:object` of docs/architecture.md's "How to add a trainer" (the ORPO/CPO walk-through) exists."""
    import re

    tool = architecture()
    text = (DOCS / "architecture.md").read_text(encoding="utf-8")
    section = text[text.index("## How to add a trainer") :]
    named = re.findall(r"`(trl_prefix_share[\w.]*:[\w.]+)`", section)
    assert len(named) >= 15, named
    for dotted in named:
        assert tool.resolve(dotted) is not None, dotted
