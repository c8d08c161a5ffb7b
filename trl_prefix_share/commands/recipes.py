"""What every training command does with a TRL recipe: parse it (runnable on CPU), build the model's init kwargs,
load its data and splits, find our trainer classes by name, and train, save and report at the end.

The recipe format is TRL's own (script, training and model arguments and dataset mixtures in one YAML, parsed by
`trl.TrlParser`), so an existing TRL recipe runs with only the command changed.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import torch


def cpu_overrides(argv: Sequence[str], cuda_available: bool) -> list[str]:
    """Flags that make TRL's bf16 default runnable without CUDA, unless the user chose them on the command line."""
    if cuda_available:
        return []
    given = {arg.split("=")[0] for arg in argv if arg.startswith("--")}
    extra = []
    if "--use_cpu" not in given:
        extra += ["--use_cpu", "true"]
    if "--bf16" not in given:
        extra += ["--bf16", "false"]
    if extra:
        print(f"[trl-prefix-share] no CUDA device: training on CPU with {' '.join(extra)}", file=sys.stderr)
    return extra


def parse_recipe(dataclass_types: tuple, argv: list[str]) -> tuple:
    """The recipe and command-line flags as instances of ``dataclass_types`` (unknown fields are an error)."""
    from trl import TrlParser

    parser = TrlParser(dataclass_types)
    argv = argv + cpu_overrides(argv, torch.cuda.is_available())
    return parser.parse_args_and_config(args=argv, fail_with_unknown_args=True)


def load_recipe_data(script_args: Any, dataset_args: Any) -> Any:
    """The recipe's dataset: a mixture (`datasets`) or one `dataset_name`, as TRL's scripts load them."""
    from datasets import load_dataset
    from trl import get_dataset

    if dataset_args.datasets:
        return get_dataset(dataset_args)
    if script_args.dataset_name:
        return load_dataset(script_args.dataset_name, name=script_args.dataset_config)
    raise ValueError("Give `datasets` (a mixture) or `dataset_name` in the recipe.")


def set_model_init_kwargs(training_args: Any, model_args: Any) -> None:
    """TRL's model arguments into the config's `model_init_kwargs` (the user's own entries win)."""
    kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    training_args.model_init_kwargs = {**kwargs, **(training_args.model_init_kwargs or {})}


def train_and_eval_splits(dataset: Any, script_args: Any, training_args: Any) -> tuple[Any, Any]:
    """The training split, and the test split when the config evaluates and the dataset has one."""
    train = dataset[script_args.dataset_train_split]
    evaluate = training_args.eval_strategy != "no" and script_args.dataset_test_split in dataset
    return train, (dataset[script_args.dataset_test_split] if evaluate else None)


def public_class(name: str) -> Any:
    """A public class of this package, by name (ORPO/CPO load lazily: they live in `trl.experimental`)."""
    import trl_prefix_share

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    return getattr(trl_prefix_share, name)


def train_save_and_report(
    trainer: Any, training_args: Any, script_args: Any, counted: str = "tokens processed"
) -> None:
    """Train (resuming if asked), save, print the tokens saved, and push when asked: the end of every command."""
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    totals = trainer.prefix_share_totals
    if totals["tokens"]:
        ratio = totals["stock_tokens"] / totals["tokens"]
        trainer.accelerator.print(
            f"[trl-prefix-share] {counted}: {totals['tokens']:,} (stock TRL: {totals['stock_tokens']:,}, "
            f"{ratio:.2f}x); model saved to {training_args.output_dir}"
        )
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
