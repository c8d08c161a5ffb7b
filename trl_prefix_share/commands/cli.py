"""`trl-prefix-share`: TRL-style training commands with prefix sharing.

    trl-prefix-share dpo  --config recipes/dpo_tiny_cpu.yaml [--flag value ...]   (also orpo, cpo, reward)
    trl-prefix-share grpo --config recipes/grpo_tiny_cpu.yaml                     (also rloo)
    trl-prefix-share stepwise --config recipes/stepwise_tiny_cpu.yaml --stepwise_num_chunks 3
    trl-prefix-share estimate --dataset FILE_OR_NAME --tokenizer NAME_OR_DIR
    trl-prefix-share bench --trainer dpo --dataset hh_harmless --json out.json --plot out.png
    trl-prefix-share make-tiny-model OUT_DIR --tokenizer TOKENIZER [--family llama]

The recipe format is TRL's own (`trl dpo --config ...`): script, training and model arguments and dataset mixtures
in one YAML, parsed by `trl.TrlParser`, so an existing TRL recipe runs with only the command changed. Multi-GPU:
`trl-prefix-share dpo --config ... --accelerate_config recipes/accelerate/ddp.yaml` (as with TRL's CLI; also fsdp2,
zero3, or a name of TRL's shipped configs), or
`accelerate launch --config_file X -m trl_prefix_share.commands.cli dpo ...`.

On a machine without CUDA, TRL's `bf16=True` default cannot run: the commands switch to `use_cpu=True, bf16=False`
and say so. This module only dispatches: each command lives in its own module (`training`, `online`, `stepwise`,
`tiny_model`, `estimate`, `bench`), and the steps they share in `recipes`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from functools import partial

from trl_prefix_share.commands.online import ONLINE_COMMANDS, run_online_trainer
from trl_prefix_share.commands.stepwise import DEPRECATED_COMMAND, run_stepwise
from trl_prefix_share.commands.tiny_model import run_make_tiny_model
from trl_prefix_share.commands.training import TRAINER_COMMANDS, run_trainer


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
    "stepwise": (run_stepwise, "stepwise DPO: the reference moves to the previous step's model"),
    DEPRECATED_COMMAND: (partial(run_stepwise, deprecated_name=True), "deprecated name of `stepwise`"),
    "grpo": (
        partial(run_online_trainer, "grpo"),
        "GRPO, each prompt run once for its completions (a TRL `grpo` recipe)",
    ),
    "rloo": (
        partial(run_online_trainer, "rloo"),
        "RLOO, each prompt run once for its completions (a TRL `rloo` recipe)",
    ),
    "bench": (run_bench, "time stock TRL vs prefix sharing end to end (ratios, tokens, memory, ablations)"),
    "estimate": (run_estimate, "expected token savings of a dataset, without loading a model"),
    "make-tiny-model": (run_make_tiny_model, "build a tiny random model from a config (no download)"),
}
#: Commands that train, so `--accelerate_config` may re-launch them under `accelerate launch`.
TRAINING_COMMANDS = frozenset({*TRAINER_COMMANDS, *ONLINE_COMMANDS, "stepwise", DEPRECATED_COMMAND})


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in COMMANDS:
        lines = [f"  {name:<16} {help_text}" for name, (_, help_text) in COMMANDS.items()]
        print("usage: trl-prefix-share COMMAND [--config recipe.yaml] [options]\n\ncommands:\n" + "\n".join(lines))
        raise SystemExit(0 if argv and argv[0] in {"-h", "--help"} else 2)
    command, *rest = argv
    if command not in TRAINING_COMMANDS:
        COMMANDS[command][0](rest)
        return
    from trl_prefix_share.commands.launch import accelerate_relaunch, release_process_group, run_launch

    relaunch = accelerate_relaunch(command, rest)  # None without --accelerate_config
    if relaunch is not None:
        raise SystemExit(run_launch(relaunch))
    COMMANDS[command][0](rest)
    release_process_group()  # a worker under `accelerate launch` exits cleanly (see the helper)


if __name__ == "__main__":
    main()
