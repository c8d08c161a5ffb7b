"""`trl-prefix-share grpo|rloo --config recipe.yaml`: TRL's `trl grpo` / `trl rloo` scripts with our trainers.

The recipe is TRL's own format (script, training and model arguments, dataset mixtures), with TRL's script arguments
for the rewards: `reward_funcs` (names of TRL's shipped reward functions, or dotted import paths such as
`recipes.rewards.vowel_reward`, resolved from the working directory as TRL's script does) and
`reward_model_name_or_path`.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

from trl_prefix_share.commands.recipes import (
    load_recipe_data,
    parse_recipe,
    public_class,
    set_model_init_kwargs,
    train_and_eval_splits,
    train_save_and_report,
)

#: TRL's shipped reward functions, by the names TRL's scripts accept (built on first use: some need extra packages).
TRL_REWARDS: dict[str, Callable[[], Any]] = {
    "accuracy_reward": lambda: importlib.import_module("trl.rewards").accuracy_reward,
    "reasoning_accuracy_reward": lambda: importlib.import_module("trl.rewards").reasoning_accuracy_reward,
    "think_format_reward": lambda: importlib.import_module("trl.rewards").think_format_reward,
    "get_soft_overlong_punishment": lambda: importlib.import_module("trl.rewards").get_soft_overlong_punishment(
        max_completion_len=1280, soft_punish_cache=256
    ),
}

#: Command -> (our trainer, our config, TRL's script-arguments class), all resolved on demand.
ONLINE_COMMANDS = {
    "grpo": ("PrefixSharedGRPOTrainer", "PrefixSharedGRPOConfig", "trl.scripts.grpo:GRPOScriptArguments"),
    "rloo": ("PrefixSharedRLOOTrainer", "PrefixSharedRLOOConfig", "trl.scripts.rloo:RLOOScriptArguments"),
}


def resolve_reward(name: str) -> Any:
    """One reward function: a name of TRL's shipped rewards, or `package.module.function` (cwd importable)."""
    if name in TRL_REWARDS:
        return TRL_REWARDS[name]()
    if "." not in name:
        raise ValueError(
            f"Unknown reward function {name!r}: give one of {sorted(TRL_REWARDS)} or a dotted import path such as "
            "`recipes.rewards.vowel_reward`."
        )
    module_name, attribute = name.rsplit(".", 1)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"Could not import reward function {name!r}: {error}") from error


def reward_functions(script_args: Any) -> list[Any]:
    """A reward model (by name or path) first, then the reward functions, as TRL's scripts order them."""
    rewards: list[Any] = []
    if script_args.reward_model_name_or_path:
        rewards.append(script_args.reward_model_name_or_path)
    rewards.extend(resolve_reward(name) for name in script_args.reward_funcs or [])
    if not rewards:
        raise ValueError("Give `reward_funcs` (or `reward_model_name_or_path`) in the recipe: GRPO and RLOO need one.")
    return rewards


def script_arguments(name: str) -> type:
    """TRL's script-arguments dataclass of `trl grpo` / `trl rloo` (dataset, splits, reward functions)."""
    module_name, class_name = ONLINE_COMMANDS[name][2].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def run_online_trainer(name: str, argv: list[str]) -> None:
    """`grpo` / `rloo`: parse the recipe, load the prompts, train, save, and print the tokens saved."""
    from trl import DatasetMixtureConfig, ModelConfig, get_peft_config, get_quantization_config

    trainer_name, config_name, _ = ONLINE_COMMANDS[name]
    script_args, training_args, model_args, dataset_args = parse_recipe(
        (script_arguments(name), public_class(config_name), ModelConfig, DatasetMixtureConfig), argv
    )
    set_model_init_kwargs(training_args, model_args)
    train, evaluate = train_and_eval_splits(load_recipe_data(script_args, dataset_args), script_args, training_args)
    trainer = public_class(trainer_name)(
        model=model_args.model_name_or_path,
        reward_funcs=reward_functions(script_args),
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluate,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    train_save_and_report(trainer, training_args, script_args, counted="policy-forward tokens")
