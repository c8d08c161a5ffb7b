"""The preference training commands (`dpo`, `orpo`, `cpo`, `reward`): TRL's scripts with our trainers in place."""

from __future__ import annotations

from dataclasses import dataclass

from trl_prefix_share.commands.recipes import (
    load_recipe_data,
    parse_recipe,
    public_class,
    set_model_init_kwargs,
    train_and_eval_splits,
    train_save_and_report,
)


@dataclass(frozen=True)
class TrainerCommand:
    """One training command: our trainer and config (imported on demand) and how TRL's script builds the model."""

    trainer: str  # names exported by `trl_prefix_share`
    config: str
    # "name": pass the model name (TRL's `dpo`/`reward` scripts); "causal_lm": load it first (TRL's ORPO/CPO
    # example scripts, whose trainers would otherwise place it with `device_map="auto"`).
    model_loading: str = "name"
    # PEFT task of `--use_peft`: reward models are sequence classifiers.
    lora_task_type: str | None = None


TRAINER_COMMANDS = {
    "dpo": TrainerCommand("PrefixSharedDPOTrainer", "PrefixSharedDPOConfig"),
    "orpo": TrainerCommand("PrefixSharedORPOTrainer", "PrefixSharedORPOConfig", "causal_lm"),
    "cpo": TrainerCommand("PrefixSharedCPOTrainer", "PrefixSharedCPOConfig", "causal_lm"),
    "reward": TrainerCommand("PrefixSharedRewardTrainer", "PrefixSharedRewardConfig", lora_task_type="SEQ_CLS"),
}


def trainer_inputs(command: TrainerCommand, training_args, model_args) -> dict:
    """`model`, `peft_config` and (where the trainer takes it) `quantization_config`, as TRL's scripts build them."""
    from trl import get_peft_config, get_quantization_config

    if command.lora_task_type and model_args.lora_task_type == "CAUSAL_LM":
        model_args.lora_task_type = command.lora_task_type
    inputs: dict = {"peft_config": get_peft_config(model_args)}
    if command.model_loading == "causal_lm":
        from transformers import AutoModelForCausalLM

        init_kwargs = {k: v for k, v in training_args.model_init_kwargs.items() if v is not None}
        inputs["model"] = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **init_kwargs)
        training_args.model_init_kwargs = None  # used up: these trainers refuse kwargs with a loaded model
    else:
        inputs["model"] = model_args.model_name_or_path
        inputs["quantization_config"] = get_quantization_config(model_args)
    return inputs


def run_trainer(name: str, argv: list[str]) -> None:
    """A training command: TRL's script for this trainer with our prefix-shared trainer in its place."""
    from transformers import AutoTokenizer
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments

    from trl_prefix_share.core.vision.image_inputs import has_image_column

    command = TRAINER_COMMANDS[name]
    config_class = public_class(command.config)
    script_args, training_args, model_args, dataset_args = parse_recipe(
        (ScriptArguments, config_class, ModelConfig, DatasetMixtureConfig), argv
    )
    set_model_init_kwargs(training_args, model_args)
    train, evaluate = train_and_eval_splits(load_recipe_data(script_args, dataset_args), script_args, training_args)
    # Image data: the model's processor, which the trainer loads itself as TRL's `dpo` script lets it do.
    images = name == "dpo" and has_image_column(getattr(train, "column_names", None))
    trainer = public_class(command.trainer)(
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluate,
        processing_class=None if images else AutoTokenizer.from_pretrained(model_args.model_name_or_path),
        **trainer_inputs(command, training_args, model_args),
    )
    train_save_and_report(trainer, training_args, script_args)
