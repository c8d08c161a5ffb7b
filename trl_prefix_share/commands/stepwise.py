"""`trl-prefix-share stepwise`: stepwise DPO over chunks of the training split (`trainers.stepwise.StepwiseDPO`).

`sdpo` is the deprecated name of this command (release 0.1), kept for one release with its `--sdpo_*` options: it
shares its name with TRL's own `trl.experimental.sdpo` (self-distillation), a different method.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field

from trl_prefix_share.commands.recipes import (
    load_recipe_data,
    parse_recipe,
    set_model_init_kwargs,
    train_and_eval_splits,
)

DEPRECATED_COMMAND = "sdpo"
_PREFIX, _DEPRECATED_PREFIX = "stepwise_", "sdpo_"


@dataclass
class StepwiseArguments:
    """Options of the `stepwise` command (see `trl_prefix_share.trainers.stepwise.StepwiseDPOConfig`)."""

    stepwise_num_chunks: int = field(default=2, metadata={"help": "Number of equal steps."})
    stepwise_chunk_column: str | None = field(default=None, metadata={"help": "Column whose values name the steps."})
    stepwise_chunk_sizes: list[int] | None = field(default=None, metadata={"help": "Examples per step."})
    stepwise_chunk_fractions: list[float] | None = field(default=None, metadata={"help": "Fraction of data per step."})
    stepwise_order_by_difficulty: bool = field(default=False, metadata={"help": "Easy-to-hard order (one extra pass)."})
    stepwise_fresh_schedule: bool = field(default=True, metadata={"help": "Restart the LR schedule at every step."})


#: The same options under their deprecated `sdpo_*` names, for the `sdpo` command (built from the one definition).
DeprecatedSDPOArguments = dataclasses.make_dataclass(
    "DeprecatedSDPOArguments",
    [
        (_DEPRECATED_PREFIX + f.name.removeprefix(_PREFIX), f.type, field(default=f.default, metadata=f.metadata))
        for f in dataclasses.fields(StepwiseArguments)
    ],
)


def _options(parsed: object, prefix: str) -> dict:
    """The parsed options without their prefix (`num_chunks`, `chunk_column`, ...)."""
    return {f.name.removeprefix(prefix): getattr(parsed, f.name) for f in dataclasses.fields(parsed)}


def run_stepwise(argv: list[str], deprecated_name: bool = False) -> None:
    """Stepwise DPO over chunks of the training split; the final model goes to `<output_dir>/final`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, get_peft_config

    from trl_prefix_share.trainers.dpo.config import PrefixSharedDPOConfig
    from trl_prefix_share.trainers.stepwise import StepwiseDPO, StepwiseDPOConfig

    if deprecated_name:
        warnings.warn(
            "`trl-prefix-share sdpo` is deprecated and will be removed in the next release: use "
            "`trl-prefix-share stepwise` with `stepwise_*` options (`sdpo_num_chunks` -> `stepwise_num_chunks`, ...).",
            FutureWarning,
            stacklevel=2,
        )
    arguments, prefix = (
        (DeprecatedSDPOArguments, _DEPRECATED_PREFIX) if deprecated_name else (StepwiseArguments, _PREFIX)
    )
    script_args, training_args, model_args, dataset_args, stepwise = parse_recipe(
        (ScriptArguments, PrefixSharedDPOConfig, ModelConfig, DatasetMixtureConfig, arguments), argv
    )
    set_model_init_kwargs(training_args, model_args)
    train, evaluate = train_and_eval_splits(load_recipe_data(script_args, dataset_args), script_args, training_args)
    init_kwargs = {k: v for k, v in training_args.model_init_kwargs.items() if v is not None}
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **init_kwargs)
    stepwise_dpo = StepwiseDPO(
        model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluate,
        processing_class=AutoTokenizer.from_pretrained(model_args.model_name_or_path),
        sdpo_config=StepwiseDPOConfig(**_options(stepwise, prefix)),
        peft_config=get_peft_config(model_args),
    )
    final = stepwise_dpo.train()
    target = f"{training_args.output_dir}/final"
    final.save_pretrained(target)
    stepwise_dpo.processing_class.save_pretrained(target)
    print(
        f"[trl-prefix-share] stepwise DPO finished {len(stepwise_dpo.trainers)} step(s); final model saved to {target}"
    )
