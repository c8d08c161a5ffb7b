"""The tested releases are stated once (`core/tested_versions.py`) and agree with what `make test` (the lock) and
`make test-lowest` install; past the newest tested transformers, every refusal names both versions."""

from __future__ import annotations

import re
import types
import warnings
from pathlib import Path

import pytest

from trl_prefix_share.core import tested_versions
from trl_prefix_share.core.installer import PrefixShareFallbackWarning, fall_back
from trl_prefix_share.core.model_support import UnsupportedModelError

ROOT = Path(__file__).resolve().parents[1]


def pins(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", line.strip())
        if match:
            found[match.group(1).lower().replace("_", "-")] = match.group(2)
    return found


@pytest.mark.parametrize("package", sorted(tested_versions.TESTED_RANGES))
def test_the_lock_and_the_lowest_constraints_are_the_tested_range(package):
    lowest, newest = tested_versions.TESTED_RANGES[package]
    assert pins(ROOT / "requirements" / "lock.txt")[package] == newest
    assert pins(ROOT / "requirements" / "lowest.txt")[package] == lowest
    declared = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(rf'"{package}>={re.escape(lowest)}[,"]', declared), (
        f"pyproject's floor of {package} is not {lowest}"
    )


def test_the_lock_pins_every_installed_dependency_but_torch():
    locked = pins(ROOT / "requirements" / "lock.txt")
    assert "torch" not in locked  # the Makefile's TORCH pins it, so GPU users can keep their own build
    for package in ("transformers", "trl", "peft", "datasets", "accelerate", "tokenizers", "pytest", "ruff", "kernels"):
        assert package in locked, package


@pytest.fixture
def newer_than_tested(monkeypatch):
    installed = tested_versions.installed_version("transformers")
    monkeypatch.setitem(tested_versions.TESTED_RANGES, "transformers", ("5.0.0", "5.0.0"))
    tested_versions.version_drift_note.cache_clear()
    yield installed
    tested_versions.version_drift_note.cache_clear()


def test_a_newer_transformers_is_named_in_refusals(newer_than_tested):
    message = str(UnsupportedModelError("FooForCausalLM has a mixer the packed path does not serve"))
    assert f"transformers {newer_than_tested} is installed" in message and "newest release tested is 5.0.0" in message
    trainer = types.SimpleNamespace(prefix_share_args=types.SimpleNamespace(on_unsupported_model="fallback"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fall_back(trainer, message)
    (warning,) = [w for w in caught if issubclass(w.category, PrefixShareFallbackWarning)]
    assert str(warning.message).count("newest release tested is 5.0.0") == 1
    trainer.prefix_share_args.on_unsupported_model = "error"
    with pytest.raises(UnsupportedModelError, match=f"transformers {re.escape(newer_than_tested)} is installed"):
        fall_back(trainer, "plain reason")


def test_no_note_in_the_tested_range():
    tested_versions.version_drift_note.cache_clear()
    installed = tested_versions.installed_version("transformers")
    lowest, newest = tested_versions.TESTED_RANGES["transformers"]
    if installed != newest and installed != lowest:
        pytest.skip(f"transformers {installed} is not a tested release")
    assert str(UnsupportedModelError("reason")) == "reason"
