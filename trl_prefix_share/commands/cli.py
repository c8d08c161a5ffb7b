"""`trl-prefix-share`: TRL-style training commands with prefix sharing.

    trl-prefix-share dpo  --config recipes/dpo_tiny_cpu.yaml [--flag value ...]   (also orpo, cpo, reward)
    trl-prefix-share grpo --config recipes/grpo_tiny_cpu.yaml                     (also rloo)
    trl-prefix-share sdpo --config recipes/sdpo_tiny_cpu.yaml --sdpo_num_chunks 3
    trl-prefix-share estimate --dataset FILE_OR_NAME --tokenizer NAME_OR_DIR
    trl-prefix-share bench --trainer dpo --dataset hh_harmless --json out.json --plot out.png
    trl-prefix-share make-tiny-model OUT_DIR --tokenizer TOKENIZER [--family llama]

The recipe format is TRL's own (`trl dpo --config ...`): script, training and model arguments and dataset mixtures
in one YAML, parsed by `trl.TrlParser`, so an existing TRL recipe runs with only the command changed. Multi-GPU:
`trl-prefix-share dpo --config ... --accelerate_config recipes/accelerate/ddp.yaml` (as with TRL's CLI; also fsdp2,
zero3, or a name of TRL's shipped configs), or
`accelerate launch --config_file X -m trl_prefix_share.commands.cli dpo ...`.

On a machine without CUDA, TRL's `bf16=True` default cannot run: the commands switch to `use_cpu=True, bf16=False`
and say so.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch

logger = logging.getLogger("trl_prefix_share")


@dataclass
class StepwiseArguments:
    """sDPO options of the `sdpo` command (see `trl_prefix_share.trainers.sdpo.StepwiseDPOConfig`)."""

    sdpo_num_chunks: int = field(default=2, metadata={"help": "Number of equal sDPO steps."})
    sdpo_chunk_column: str | None = field(default=None, metadata={"help": "Column whose values name the steps."})
    sdpo_chunk_sizes: list[int] | None = field(default=None, metadata={"help": "Examples per step."})
    sdpo_chunk_fractions: list[float] | None = field(default=None, metadata={"help": "Fraction of data per step."})
    sdpo_order_by_difficulty: bool = field(default=False, metadata={"help": "Easy-to-hard order (one extra pass)."})
    sdpo_fresh_schedule: bool = field(default=True, metadata={"help": "Restart the LR schedule at every step."})


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


def _parse(dataclass_types: tuple, argv: list[str]):
    from trl import TrlParser

    parser = TrlParser(dataclass_types)
    argv = argv + cpu_overrides(argv, torch.cuda.is_available())
    return parser.parse_args_and_config(args=argv, fail_with_unknown_args=True)


def _load_data(script_args, dataset_args):
    from datasets import load_dataset
    from trl import get_dataset

    if dataset_args.datasets:
        return get_dataset(dataset_args)
    if script_args.dataset_name:
        return load_dataset(script_args.dataset_name, name=script_args.dataset_config)
    raise ValueError("Give `datasets` (a mixture) or `dataset_name` in the recipe.")


def _model_kwargs(training_args, model_args) -> None:
    kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    training_args.model_init_kwargs = {**kwargs, **(training_args.model_init_kwargs or {})}


def _splits(dataset, script_args, training_args):
    train = dataset[script_args.dataset_train_split]
    evaluate = training_args.eval_strategy != "no" and script_args.dataset_test_split in dataset
    return train, (dataset[script_args.dataset_test_split] if evaluate else None)


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


def _import(name: str):
    """A public class of this package, by name (ORPO/CPO load lazily: they live in `trl.experimental`)."""
    import os

    import trl_prefix_share

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    return getattr(trl_prefix_share, name)


def _trainer_inputs(command: TrainerCommand, training_args, model_args) -> dict:
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
    config_class = _import(command.config)
    script_args, training_args, model_args, dataset_args = _parse(
        (ScriptArguments, config_class, ModelConfig, DatasetMixtureConfig), argv
    )
    _model_kwargs(training_args, model_args)
    train, evaluate = _splits(_load_data(script_args, dataset_args), script_args, training_args)
    # Image data: the model's processor, which the trainer loads itself as TRL's `dpo` script lets it do.
    images = name == "dpo" and has_image_column(getattr(train, "column_names", None))
    trainer = _import(command.trainer)(
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluate,
        processing_class=None if images else AutoTokenizer.from_pretrained(model_args.model_name_or_path),
        **_trainer_inputs(command, training_args, model_args),
    )
    train_save_and_report(trainer, training_args, script_args)


def train_save_and_report(trainer, training_args, script_args, counted: str = "tokens processed") -> None:
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


def run_sdpo(argv: list[str]) -> None:
    """The `sdpo` command: stepwise DPO over chunks of the training split."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, get_peft_config

    from trl_prefix_share.trainers.dpo.config import PrefixSharedDPOConfig
    from trl_prefix_share.trainers.sdpo import StepwiseDPO, StepwiseDPOConfig

    script_args, training_args, model_args, dataset_args, stepwise = _parse(
        (ScriptArguments, PrefixSharedDPOConfig, ModelConfig, DatasetMixtureConfig, StepwiseArguments), argv
    )
    _model_kwargs(training_args, model_args)
    train, evaluate = _splits(_load_data(script_args, dataset_args), script_args, training_args)
    init_kwargs = {k: v for k, v in training_args.model_init_kwargs.items() if v is not None}
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **init_kwargs)
    config = StepwiseDPOConfig(
        chunk_column=stepwise.sdpo_chunk_column,
        chunk_sizes=stepwise.sdpo_chunk_sizes,
        chunk_fractions=stepwise.sdpo_chunk_fractions,
        num_chunks=stepwise.sdpo_num_chunks,
        order_by_difficulty=stepwise.sdpo_order_by_difficulty,
        fresh_schedule=stepwise.sdpo_fresh_schedule,
    )
    sdpo = StepwiseDPO(
        model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluate,
        processing_class=AutoTokenizer.from_pretrained(model_args.model_name_or_path),
        sdpo_config=config,
        peft_config=get_peft_config(model_args),
    )
    final = sdpo.train()
    target = f"{training_args.output_dir}/final"
    final.save_pretrained(target)
    sdpo.processing_class.save_pretrained(target)
    print(f"[trl-prefix-share] sDPO finished {len(sdpo.trainers)} step(s); final model saved to {target}")


def run_make_tiny_model(argv: list[str]) -> None:
    """`make-tiny-model OUT --tokenizer DIR`: a tiny random causal LM for smoke tests and CPU recipes."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser(prog="trl-prefix-share make-tiny-model")
    parser.add_argument("output_dir")
    parser.add_argument("--tokenizer", required=True, help="tokenizer name or directory (copied next to the model)")
    parser.add_argument("--family", default="llama", help="model_type of the config (llama, qwen2, qwen3, mistral)")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    config = AutoConfig.for_model(
        args.family,
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=2 * args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
    )
    torch.manual_seed(args.seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    print(f"[trl-prefix-share] tiny {args.family} model saved to {args.output_dir}")


def run_online(name: str, argv: list[str]) -> None:
    """`grpo` / `rloo`: TRL's online RL scripts (reward functions by name or import path) with our trainers."""
    from trl_prefix_share.commands.online import run_online_trainer

    run_online_trainer(name, argv)


def run_estimate(argv: list[str]) -> None:
    """`estimate --dataset X --tokenizer Y`: tokens stock TRL would run vs ours, without a model."""
    from trl_prefix_share.commands.estimate import run_estimate as estimate

    estimate(argv)


def run_bench(argv: list[str]) -> None:
    """`bench`: stock TRL vs prefix sharing (and the ablations), end to end, alternating runs."""
    from trl_prefix_share.commands.bench.command import run_bench as bench

    bench(argv)


COMMANDS: dict[str, tuple[Callable[[list[str]], None], str]] = {
    "dpo": (partial(run_trainer, "dpo"), "DPO with prefix sharing (a TRL `dpo` recipe works as is)"),
    "orpo": (partial(run_trainer, "orpo"), "ORPO with prefix sharing (TRL's ORPO script arguments)"),
    "cpo": (partial(run_trainer, "cpo"), "CPO / SimPO (`loss_type: simpo`) with prefix sharing"),
    "reward": (partial(run_trainer, "reward"), "reward model with prefix sharing (a TRL `reward` recipe works as is)"),
    "sdpo": (run_sdpo, "stepwise DPO: the reference moves to the previous step's model"),
    "grpo": (partial(run_online, "grpo"), "GRPO, each prompt run once for its completions (a TRL `grpo` recipe)"),
    "rloo": (partial(run_online, "rloo"), "RLOO, each prompt run once for its completions (a TRL `rloo` recipe)"),
    "bench": (run_bench, "time stock TRL vs prefix sharing end to end (ratios, tokens, memory, ablations)"),
    "estimate": (run_estimate, "expected token savings of a dataset, without loading a model"),
    "make-tiny-model": (run_make_tiny_model, "build a tiny random model from a config (no download)"),
}


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in COMMANDS:
        lines = [f"  {name:<16} {help_text}" for name, (_, help_text) in COMMANDS.items()]
        print("usage: trl-prefix-share COMMAND [--config recipe.yaml] [options]\n\ncommands:\n" + "\n".join(lines))
        raise SystemExit(0 if argv and argv[0] in {"-h", "--help"} else 2)
    command, *rest = argv
    if command in TRAINER_COMMANDS or command in {"sdpo", "grpo", "rloo"}:
        from trl_prefix_share.commands.launch import accelerate_relaunch, run_launch

        relaunch = accelerate_relaunch(command, rest)  # None without --accelerate_config
        if relaunch is not None:
            raise SystemExit(run_launch(relaunch))
    COMMANDS[command][0](rest)


if __name__ == "__main__":
    main()
