"""The CLI runs TRL-format recipes end to end on CPU (tiny model, real data), including TRL's bf16 default."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import TOKENIZER_DIR

from trl_prefix_share.cli import cpu_overrides, main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("cli-tiny")
    main(["make-tiny-model", str(path), "--tokenizer", str(TOKENIZER_DIR), "--hidden-size", "32"])
    return str(path)


def test_cpu_overrides_respect_explicit_choices():
    assert cpu_overrides(["--config", "x.yaml"], cuda_available=False) == ["--use_cpu", "true", "--bf16", "false"]
    assert cpu_overrides(["--bf16", "true"], cuda_available=False) == ["--use_cpu", "true"]
    assert cpu_overrides([], cuda_available=True) == []


def test_dpo_recipe_runs(tiny_model, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    main(
        [
            "dpo",
            "--config",
            "recipes/dpo_tiny_cpu.yaml",
            "--model_name_or_path",
            tiny_model,
            "--output_dir",
            str(tmp_path),
            "--max_steps",
            "2",
        ]
    )
    out = capsys.readouterr()
    assert "training on CPU with --use_cpu true --bf16 false" in out.err
    assert "tokens processed" in out.out
    assert (tmp_path / "model.safetensors").exists()
    ratio = re.search(r"stock TRL: [\d,]+, ([\d.]+)x\)", out.out)
    assert ratio and float(ratio.group(1)) > 1.0


def test_sdpo_recipe_runs(tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    main(
        [
            "sdpo",
            "--config",
            "recipes/sdpo_tiny_cpu.yaml",
            "--model_name_or_path",
            tiny_model,
            "--output_dir",
            str(tmp_path),
        ]
    )
    assert json.loads((tmp_path / "sdpo_state.json").read_text())["completed"] == [1, 2]
    assert (tmp_path / "final" / "model.safetensors").exists()


def test_unknown_command_prints_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["nope"])
    assert exit_info.value.code == 2 and "commands:" in capsys.readouterr().out
