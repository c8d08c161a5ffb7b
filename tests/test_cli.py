"""The CLI runs TRL-format recipes end to end on CPU (tiny model, real data), including TRL's bf16 default."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import TOKENIZER_DIR

from trl_prefix_share.commands.cli import main
from trl_prefix_share.commands.recipes import cpu_overrides

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


@pytest.mark.parametrize(
    ("command", "recipe"),
    [("orpo", "orpo_tiny_cpu.yaml"), ("cpo", "simpo_tiny_cpu.yaml"), ("reward", "reward_tiny_cpu.yaml")],
)
def test_other_trainer_recipes_run(command, recipe, tiny_model, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    main([command, "--config", f"recipes/{recipe}", "--model_name_or_path", tiny_model, "--output_dir", str(tmp_path)])
    out = capsys.readouterr().out
    ratio = re.search(r"stock TRL: [\d,]+, ([\d.]+)x\)", out)
    assert ratio and float(ratio.group(1)) > 1.0
    assert (tmp_path / "model.safetensors").exists()
    if command == "reward":  # a causal-LM checkpoint became a 1-label sequence classifier
        config = json.loads((tmp_path / "config.json").read_text())
        assert config["architectures"][0].endswith("ForSequenceClassification")


@pytest.mark.parametrize("command", ["grpo", "rloo"])
def test_online_recipes_run(command, tiny_model, tmp_path, capsys, monkeypatch):
    """TRL's grpo / rloo script with our trainer: the reward function comes by import path, as in TRL's script."""
    monkeypatch.chdir(REPO)
    recipe = f"recipes/{command}_tiny_cpu.yaml"
    main([command, "--config", recipe, "--model_name_or_path", tiny_model, "--output_dir", str(tmp_path)])
    out = capsys.readouterr().out
    ratio = re.search(r"stock TRL: [\d,]+, ([\d.]+)x\)", out)
    assert ratio and float(ratio.group(1)) > 1.0
    assert (tmp_path / "model.safetensors").exists()


def test_reward_functions_resolve_like_trl_scripts(monkeypatch):
    from types import SimpleNamespace

    from trl_prefix_share.commands.online import resolve_reward, reward_functions

    monkeypatch.chdir(REPO)
    assert resolve_reward("recipes.rewards.vowel_reward")(["aei", "b"]) == [3.0, 0.0]
    assert callable(resolve_reward("think_format_reward"))
    with pytest.raises(ValueError, match="Unknown reward function 'nonsense'"):
        resolve_reward("nonsense")
    with pytest.raises(ValueError, match="Could not import reward function 'recipes.rewards.missing'"):
        resolve_reward("recipes.rewards.missing")
    with pytest.raises(ValueError, match="reward_funcs"):
        reward_functions(SimpleNamespace(reward_model_name_or_path=None, reward_funcs=None))


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "recipes").glob("*.yaml")))
def test_every_recipe_parses_with_its_command(recipe):
    """Each recipe's fields exist in its command's dataclasses (a typo would fail the user's run at start)."""
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

    from trl_prefix_share.commands.online import ONLINE_COMMANDS, script_arguments
    from trl_prefix_share.commands.recipes import public_class as _import
    from trl_prefix_share.commands.stepwise import StepwiseArguments
    from trl_prefix_share.commands.training import TRAINER_COMMANDS

    name = recipe.split("_")[0]
    if name in ONLINE_COMMANDS:
        _, config, _ = ONLINE_COMMANDS[name]
        types = [script_arguments(name), _import(config), ModelConfig, DatasetMixtureConfig]
    else:
        command = TRAINER_COMMANDS["cpo" if name == "simpo" else "dpo" if name == "stepwise" else name]
        types = [ScriptArguments, _import(command.config), ModelConfig, DatasetMixtureConfig]
    if name == "stepwise":
        types.append(StepwiseArguments)
    parsed = TrlParser(types).parse_args_and_config(
        args=["--config", str(REPO / "recipes" / recipe), "--use_cpu", "true", "--bf16", "false"],
        fail_with_unknown_args=True,
    )
    assert parsed[1].output_dir.startswith("outputs/")
    if name == "simpo":
        assert parsed[1].loss_type == "simpo"


def test_stepwise_recipe_runs(tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    main(
        [
            "stepwise",
            "--config",
            "recipes/stepwise_tiny_cpu.yaml",
            "--model_name_or_path",
            tiny_model,
            "--output_dir",
            str(tmp_path),
        ]
    )
    assert json.loads((tmp_path / "sdpo_state.json").read_text())["completed"] == [1, 2]
    assert (tmp_path / "final" / "model.safetensors").exists()


def test_deprecated_sdpo_command_runs_a_0_1_recipe(tiny_model, tmp_path, monkeypatch):
    """`sdpo` (release 0.1's name of `stepwise`) still takes a recipe with `sdpo_*` options, and says it is going."""
    monkeypatch.chdir(REPO)
    recipe = (
        (REPO / "recipes" / "stepwise_tiny_cpu.yaml")
        .read_text()
        .replace("stepwise_num_chunks: 2", "sdpo_num_chunks: 1")
    )
    assert "sdpo_num_chunks: 1" in recipe
    (tmp_path / "old.yaml").write_text(recipe)
    with pytest.warns(FutureWarning, match="trl-prefix-share stepwise"):
        main(
            [
                "sdpo",
                "--config",
                str(tmp_path / "old.yaml"),
                "--model_name_or_path",
                tiny_model,
                "--output_dir",
                str(tmp_path),
            ]
        )
    assert json.loads((tmp_path / "sdpo_state.json").read_text())["completed"] == [1]
    with pytest.raises(ValueError, match="sdpo_num_chunks"):  # the new command does not take the old option names
        main(["stepwise", "--config", str(tmp_path / "old.yaml"), "--model_name_or_path", tiny_model])


def test_unknown_command_prints_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["nope"])
    assert exit_info.value.code == 2 and "commands:" in capsys.readouterr().out


def test_accelerate_config_relaunches_the_command(monkeypatch):
    """`--accelerate_config ddp` re-runs the same command under `accelerate launch` with our DDP config, without the
    flag, and exits with the launch's status (TRL's CLI behaves the same way)."""
    from trl_prefix_share.commands import launch

    launched = []
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(launch, "run_launch", lambda command: launched.append(command) or 7)
    with pytest.raises(SystemExit) as exit_info:
        main(["orpo", "--config", "recipes/orpo_tiny_cpu.yaml", "--accelerate_config", "ddp", "--max_steps", "2"])
    assert exit_info.value.code == 7
    (command,) = launched
    assert command[command.index("--config_file") + 1] == str(REPO / "recipes" / "accelerate" / "ddp.yaml")
    tail = command[command.index("-m", command.index("--config_file")) :]
    assert tail == [
        "-m",
        "trl_prefix_share.commands.cli",
        "orpo",
        "--config",
        "recipes/orpo_tiny_cpu.yaml",
        "--max_steps",
        "2",
    ]


def test_dpo_command_on_image_data_loads_the_processor(tmp_path, capsys):
    """`trl-prefix-share dpo` on a dataset with an `images` column: the trainer loads the model's processor (as TRL's
    `dpo` script lets it), each image is encoded once per pair, and the model is saved."""
    from vision_setup import build_vision_model

    from trl_prefix_share.commands.image_preferences import image_preference_dataset

    tiny = build_vision_model("llava")
    tiny.model.save_pretrained(tmp_path / "model")
    tiny.processor.save_pretrained(tmp_path / "model")
    (tmp_path / "data").mkdir()
    image_preference_dataset(4, seed=1).to_parquet(str(tmp_path / "data" / "train.parquet"))
    main(
        [
            "dpo",
            "--model_name_or_path",
            str(tmp_path / "model"),
            "--dataset_name",
            str(tmp_path / "data"),
            "--output_dir",
            str(tmp_path / "out"),
            "--max_steps",
            "1",
            "--per_device_train_batch_size",
            "2",
            "--report_to",
            "none",
        ]
    )
    out = capsys.readouterr().out
    ratio = re.search(r"stock TRL: [\d,]+, ([\d.]+)x\)", out)
    assert ratio and float(ratio.group(1)) > 1.2
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_a_training_command_releases_the_process_group_when_it_returns(monkeypatch, tmp_path):
    """A worker under `accelerate launch` must not keep its process group to interpreter exit, where gloo's threads
    can abort the process after training finished (seen in CI: SIGABRT, a failed launch for a saved model). After a
    training command returns the group is gone; after one that raises it is left alone (a destroy could wait on
    ranks that failed)."""
    import torch.distributed as dist

    from trl_prefix_share.commands import cli

    seen = []
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setitem(cli.COMMANDS, "dpo", (lambda argv: seen.append(dist.is_initialized()), "stub"))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        main(["dpo"])
        assert seen == [True] and not dist.is_initialized()

        def failing(argv):
            raise RuntimeError("rank failed")

        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store2'}", rank=0, world_size=1)
        monkeypatch.setitem(cli.COMMANDS, "dpo", (failing, "stub"))
        with pytest.raises(RuntimeError, match="rank failed"):
            main(["dpo"])
        assert dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
