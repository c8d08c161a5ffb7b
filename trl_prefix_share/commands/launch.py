"""`--accelerate_config` for the training commands: re-run the command under `accelerate launch`.

    trl-prefix-share dpo --accelerate_config zero3 --config recipe.yaml [--num_processes 4] [...]
    == accelerate launch --config_file <zero3.yaml> [--num_processes 4] \
           -m trl_prefix_share.commands.cli dpo --config ...

As in TRL's CLI (`trl dpo --accelerate_config zero3`), the value is a path to an accelerate config file or the name
of a known one without `.yaml`: ours in `recipes/accelerate/` (`ddp`, `fsdp2`, `zero3`, `cpu_2proc`; in a source
checkout), then TRL's in `trl/accelerate_configs/` (`multi_gpu`, `fsdp1`, `fsdp2`, `zero1`, `zero2`, `zero3`, ...).
Unlike TRL, the commands run in-process when the flag is absent
(`accelerate launch -m trl_prefix_share.commands.cli ...` works as well), and only the launcher flags in
`LAUNCHER_FLAGS` go to accelerate; everything else stays with the command.
"""

from __future__ import annotations

import importlib.resources as resources
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

FLAG = "--accelerate_config"
OUR_CONFIGS = Path(__file__).resolve().parents[2] / "recipes" / "accelerate"
# `accelerate launch` options worth overriding per run (a config's `num_processes` is rarely the machine's GPU
# count); none of them is a training, model, script or dataset argument of the commands.
LAUNCHER_FLAGS = frozenset(
    {"--num_processes", "--num_machines", "--machine_rank", "--main_process_ip", "--main_process_port"}
)


def _flag_value(argv: list[str], index: int, flag: str) -> tuple[str, int]:
    """The value of `flag` at `argv[index]` (`--flag VALUE` or `--flag=VALUE`) and how many items it spans."""
    item = argv[index]
    if item.startswith(flag + "="):
        return item[len(flag) + 1 :], 1
    if index + 1 >= len(argv) or argv[index + 1].startswith("--"):
        raise ValueError(f"Expected a value after `{flag}`.")
    return argv[index + 1], 2


def split_launcher_args(argv: Sequence[str]) -> tuple[str | None, list[str], list[str]]:
    """Split argv into (the `--accelerate_config` value, accelerate launcher args, the command's own args)."""
    config, launcher, rest = None, [], []
    argv, index = list(argv), 0
    while index < len(argv):
        name = argv[index].split("=", 1)[0]
        if name == FLAG or name in LAUNCHER_FLAGS:
            value, span = _flag_value(argv, index, name)
            if name == FLAG:
                if config is not None:
                    raise ValueError(f"`{FLAG}` is given twice.")
                config = value
            else:
                launcher += [name, value]
            index += span
        else:
            rest.append(argv[index])
            index += 1
    return config, launcher, rest


def resolve_accelerate_config(value: str) -> str:
    """A config file path, or the name of one of ours (recipes/accelerate) or TRL's (trl/accelerate_configs)."""
    if Path(value).is_file():
        return value
    ours = OUR_CONFIGS / f"{value}.yaml"
    if ours.is_file():
        return str(ours)
    theirs = resources.files("trl.accelerate_configs").joinpath(f"{value}.yaml")
    if theirs.is_file():
        return str(theirs)
    known = sorted({p.stem for p in OUR_CONFIGS.glob("*.yaml")} | _trl_config_names())
    raise ValueError(f"Accelerate config {value!r} is neither a file nor a known config name ({', '.join(known)}).")


def _trl_config_names() -> set[str]:
    folder = resources.files("trl.accelerate_configs")
    return {Path(entry.name).stem for entry in folder.iterdir() if entry.name.endswith(".yaml")}


def _inside_launch() -> bool:
    """True in a worker that torchrun (accelerate's multi-process launcher) started: it sets LOCAL_RANK in each."""
    return "LOCAL_RANK" in os.environ


def accelerate_relaunch(command: str, argv: Sequence[str]) -> list[str] | None:
    """The `accelerate launch` command line that runs `command argv` per process, or None without `--accelerate_config`.

    Launcher flags (`--num_processes`, ...) given without `--accelerate_config` are left to the command, which
    rejects them as unknown, so nothing is silently ignored."""
    config, launcher, rest = split_launcher_args(argv)
    if config is None:
        return None
    if _inside_launch():
        raise ValueError(
            f"`{FLAG}` inside a process started by `accelerate launch`/torchrun would launch every worker again: "
            "use one of the two."
        )
    path = resolve_accelerate_config(config)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", path, *launcher]
    return [*launch, "-m", "trl_prefix_share.commands.cli", command, *rest]


def run_launch(command_line: Sequence[str]) -> int:
    """Run the launcher in the foreground; its exit status becomes ours (non-zero if any worker failed)."""
    print(f"[trl-prefix-share] launching: {' '.join(command_line)}", file=sys.stderr, flush=True)
    return subprocess.run(list(command_line), check=False).returncode


def release_process_group() -> None:
    """Destroy the default process group of a finished distributed run, if there is one.

    Without it, a worker can abort at interpreter exit after training finished: gloo's worker threads still hold
    work objects whose tensors are freed while Python is being torn down ("terminate called without an active
    exception", SIGABRT), and the launch reports a failure for a run that saved its model. Called only after a
    command returns normally: on an error, a collective destroy could wait for ranks that are gone."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
