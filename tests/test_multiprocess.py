"""Multi-process training through accelerate, and the accelerate configs and launcher in recipes/ and launch.py.

The slow test trains `PrefixSharedDPOTrainer` in 2 CPU processes (gloo, started by `accelerate launch` with
recipes/accelerate/cpu_2proc.yaml) at 1 example per process, and compares every step with one process at 2
examples: ours and stock `trl.DPOTrainer`. Accelerate's seeded sampler gives both the same permutation and hands
consecutive per-process batches to ranks 0 and 1, so each global batch holds the same 2 examples. The 7 examples
leave an uneven last step (1 real example; accelerate gives rank 1 a repeat), which checks that the token metrics
are summed over processes there too; the loss comparison stops before it.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import multiprocess_dpo_script as script
import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from conftest import DATA, DATASETS, TOKENIZER_DIR

from trl_prefix_share.commands import launch
from trl_prefix_share.commands.cli import main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "recipes" / "accelerate"
SCRIPT = Path(script.__file__)
HH = str(DATA / DATASETS["hh_harmless"])
EXAMPLES = 7  # prepared examples (9 rows; TRL drops 2 whose prompt fills max_length): 3 full steps of 2 + 1
FULL_STEPS = 3
# fp32; each step's global batch is the same, only reduction orders differ (DDP's all-reduce, per-process padding)
RELATIVE_TOLERANCE = 1e-5
# Metrics that sit near zero get an absolute floor: rewards are beta * (log-prob - reference log-prob) of sums around
# -500, whose float32 rounding alone is ~1e-5; `logits/*` are means of logits around 1e-4.
ABSOLUTE_TOLERANCE = {"rewards/": 1e-4, "logits/": 1e-8}


# -- accelerate configs ------------------------------------------------------------------------------------------------


def launcher_args(name: str):
    """What `accelerate launch --config_file recipes/accelerate/NAME.yaml` resolves, without launching."""
    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / f"{name}.yaml"), "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    return args, defaults


@pytest.mark.parametrize("name", ["ddp", "fsdp2", "zero3", "cpu_2proc"])
def test_config_loads_with_only_known_keys(name):
    """accelerate's loader refuses unknown top-level keys; nested ones become `accelerate launch` options."""
    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    assert isinstance(config, ClusterConfig)
    options = {action.dest for action in launch_command_parser()._actions}
    nested = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    for section in ("fsdp_config", "deepspeed_config"):
        unknown = set(nested.get(section, {})) - options
        assert not unknown, f"{name}.yaml: {section} keys unknown to accelerate launch: {unknown}"


def test_ddp_and_cpu_configs_use_the_torchrun_launcher():
    ddp, _ = launcher_args("ddp")
    assert ddp.multi_gpu and not ddp.use_fsdp and not ddp.use_deepspeed
    cpu, _ = launcher_args("cpu_2proc")
    assert cpu.multi_gpu and cpu.num_processes == 2 and cpu.main_process_port == 0 and cpu.mixed_precision == "no"


def test_fsdp2_config_builds_an_fsdp2_plugin(monkeypatch):
    """The environment the launcher hands its workers yields a valid FSDP2 plugin (built on CPU, nothing sharded)."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    args, _ = launcher_args("fsdp2")
    assert args.use_fsdp
    for key, value in prepare_multi_gpu_env(args).items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.cpu_ram_efficient_loading and "FULL_STATE_DICT" in str(plugin.state_dict_type)
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"


def test_zero3_config_sets_stage_3():
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args, defaults = launcher_args("zero3")
    assert args.use_deepspeed
    args.deepspeed_fields_from_accelerate_config = list(defaults.deepspeed_config)  # as `launch_command` sets it
    _, env = prepare_deepspeed_cmd_env(args)
    assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "3" and env["ACCELERATE_DEEPSPEED_ZERO3_INIT"] == "true"


# -- --accelerate_config -----------------------------------------------------------------------------------------------


def test_relaunch_command_line(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    config = str(CONFIGS / "ddp.yaml")
    tail = ["-m", "trl_prefix_share.commands.cli", "dpo", "--config", "r.yaml", "--beta", "0.2"]
    expected = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, *tail]
    argv = ["--config", "r.yaml", "--accelerate_config", config, "--beta", "0.2"]
    assert launch.accelerate_relaunch("dpo", argv) == expected
    assert launch.accelerate_relaunch("dpo", ["--config", "r.yaml", f"--accelerate_config={config}", "--beta", "0.2"])
    assert launch.accelerate_relaunch("dpo", ["--config", "r.yaml"]) is None
    with_port = launch.accelerate_relaunch("dpo", ["--accelerate_config", config, "--num_processes=4", "--beta", "1"])
    assert with_port[3:7] == ["--config_file", config, "--num_processes", "4"]
    assert with_port[-3:] == ["dpo", "--beta", "1"]


def test_config_names_resolve_to_ours_then_trls(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert launch.resolve_accelerate_config("cpu_2proc") == str(CONFIGS / "cpu_2proc.yaml")
    assert launch.resolve_accelerate_config("zero3") == str(CONFIGS / "zero3.yaml")
    assert launch.resolve_accelerate_config("zero2").endswith("trl/accelerate_configs/zero2.yaml")
    with pytest.raises(ValueError, match="neither a file nor a known config name"):
        launch.resolve_accelerate_config("nope")


def test_relaunch_refusals(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(ValueError, match="Expected a value"):
        launch.accelerate_relaunch("dpo", ["--accelerate_config"])
    with pytest.raises(ValueError, match="given twice"):
        launch.accelerate_relaunch("dpo", ["--accelerate_config", "ddp", "--accelerate_config", "zero3"])
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ValueError, match="launch every worker again"):
        launch.accelerate_relaunch("dpo", ["--accelerate_config", "ddp"])


def test_launcher_flags_are_not_training_options():
    """Flags routed to accelerate must not shadow an option of any training command's own parser."""
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

    import trl_prefix_share
    from trl_prefix_share.commands.stepwise import StepwiseArguments
    from trl_prefix_share.commands.training import TRAINER_COMMANDS

    configs = [getattr(trl_prefix_share, command.config) for command in TRAINER_COMMANDS.values()]
    for config in configs:
        parser = TrlParser((ScriptArguments, config, ModelConfig, DatasetMixtureConfig, StepwiseArguments))
        options = {option for action in parser._actions for option in action.option_strings}
        assert not launch.LAUNCHER_FLAGS & options, config.__name__


def test_run_launch_returns_the_exit_status():
    assert launch.run_launch([sys.executable, "-c", "raise SystemExit(3)"]) == 3


# -- 2 processes vs 1 --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("mp-tiny")
    main(["make-tiny-model", str(path), "--tokenizer", str(TOKENIZER_DIR), "--hidden-size", "32"])
    return str(path)


def script_args(
    model: str, out: Path, per_device_batch: int, trainer: str = "prefix_share", device: str = "cpu", extra=()
) -> list[str]:
    batch = ["--per-device-batch", str(per_device_batch), "--trainer", trainer, "--device", device]
    return ["--model", model, "--data", HH, "--out", str(out), *batch, *extra]


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_two_processes(
    model: str, out: Path, config: str = "cpu_2proc", device: str = "cpu", extra: tuple[str, ...] = ()
) -> list[dict]:
    """`accelerate launch --config_file recipes/accelerate/CONFIG.yaml` the script; both ranks' results."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("LOCAL_RANK", None)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / f"{config}.yaml")]
    command += ["--main_process_port", str(free_port())]  # not the default 29500: another job may hold it
    if device == "cuda":  # 2 GPUs whatever the config says, fp32 like the single-process runs
        command += ["--num_processes", "2", "--mixed_precision", "no"]
    command += [str(SCRIPT), *script_args(model, out, per_device_batch=1, device=device, extra=extra)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("mp-runs")
    return {
        "two": run_two_processes(tiny_model, out / "two"),
        "one": script.run(script_args(tiny_model, out / "one", per_device_batch=2)),
        "stock": script.run(script_args(tiny_model, out / "stock", per_device_batch=2, trainer="stock")),
    }


def steps(result: dict) -> list[dict]:
    return [entry for entry in result["log_history"] if "loss" in entry]


def assert_same_steps(actual: dict, expected: dict, label: str, tolerance: float = RELATIVE_TOLERANCE) -> None:
    """Every metric stock TRL logs, on each full global batch."""
    for step, (a, e) in enumerate(zip(steps(actual)[:FULL_STEPS], steps(expected)[:FULL_STEPS], strict=True), 1):
        for key, value in e.items():
            if key.startswith("prefix_share/"):
                continue
            floor = next((tol for prefix, tol in ABSOLUTE_TOLERANCE.items() if key.startswith(prefix)), 0.0)
            assert math.isclose(a[key], value, rel_tol=tolerance, abs_tol=floor), (label, step, key, a, e)


@pytest.mark.slow
def test_two_processes_form_a_gloo_group(runs):
    for rank, result in enumerate(runs["two"]):
        assert (result["rank"], result["num_processes"]) == (rank, 2)
        assert result["distributed_type"] == "DistributedType.MULTI_CPU"
        assert result["train_examples"] == EXAMPLES
    assert runs["one"]["num_processes"] == 1 and runs["one"]["train_examples"] == EXAMPLES


@pytest.mark.slow
def test_two_processes_match_one_process_and_stock(runs):
    two, one, stock = runs["two"][0], runs["one"], runs["stock"]
    assert len(steps(two)) == len(steps(one)) == len(steps(stock)) == FULL_STEPS + 1
    losses = [entry["loss"] for entry in steps(stock)[:FULL_STEPS]]
    assert max(losses) - min(losses) > 1e-2  # training moves the loss: not a comparison of ln 2 with itself
    assert_same_steps(two, stock, "2 processes vs stock")
    assert_same_steps(two, one, "2 processes vs 1 process")
    assert_same_steps(one, stock, "1 process vs stock")
    assert steps(runs["two"][1]) == steps(two)  # every rank logs the same gathered values


@pytest.mark.slow
def test_token_metrics_are_summed_over_processes(runs):
    two, one = runs["two"], runs["one"]
    logged = steps(two[0])
    for step, entry in enumerate(logged):
        local = [rank["local_token_counts"][step] for rank in two]
        assert entry["prefix_share/tokens"] == sum(counts[0] for counts in local), step
        assert entry["prefix_share/stock_tokens"] == sum(counts[1] for counts in local), step
    for ours, single in zip(logged[:FULL_STEPS], steps(one)[:FULL_STEPS], strict=True):
        # The same examples packed: no fewer tokens than one process's row (whose prefix tree merges the prompts of
        # both halves). Stock's batches are padded per process (to each one's longest sequence), so they hold no more
        # tokens than one padded batch of both.
        assert ours["prefix_share/tokens"] >= single["prefix_share/tokens"]
        assert ours["prefix_share/tokens"] < ours["prefix_share/stock_tokens"] <= single["prefix_share/stock_tokens"]
    totals = {"tokens": 0, "stock_tokens": 0}
    for entry in logged:
        totals["tokens"] += entry["prefix_share/tokens"]
        totals["stock_tokens"] += entry["prefix_share/stock_tokens"]
    assert two[0]["prefix_share_totals"] == two[1]["prefix_share_totals"] == totals


@pytest.mark.slow
def test_token_budget_batches_over_two_processes_match_stock_on_their_union(tiny_model, tmp_path):
    """Token-budget batches hold different numbers of pairs from step to step (equal across ranks within a step); two
    processes must train exactly as stock DPO on one batch holding both ranks' pairs, step after step."""
    budget = ("--max-batch-tokens", "500", "--examples", "16")
    two = run_two_processes(tiny_model, tmp_path / "two", extra=budget)
    union = ("--union-of-ranks", "2", "--max-batch-tokens", "500", "--examples", "16")
    stock = script.run(script_args(tiny_model, tmp_path / "stock", 1, trainer="stock", extra=union))
    two_steps, stock_steps = steps(two[0]), steps(stock)
    assert len(two_steps) == len(stock_steps) >= 3
    local = [rank["local_token_counts"] for rank in two]
    assert len({counts[1] for counts in local[0]}) > 1  # the batch size (stock's rows) varies across steps
    losses = [entry["loss"] for entry in stock_steps]
    assert max(losses) - min(losses) > 1e-2
    for step, (a, e) in enumerate(zip(two_steps, stock_steps, strict=True)):
        assert math.isclose(a["loss"], e["loss"], rel_tol=RELATIVE_TOLERANCE), (step, a["loss"], e["loss"])
        assert math.isclose(a["rewards/margins"], e["rewards/margins"], rel_tol=1e-4, abs_tol=1e-6), step


# -- the same on GPUs --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("config", ["ddp", "fsdp2", "zero3"])
def test_two_gpus_match_one_gpu_stock(config, tiny_model, tmp_path):
    """The comparison above on 2 GPUs under each recipe config (fp32). Written without a GPU and never run so far:
    the tolerance is a guess (sharded reductions, FlexAttention vs stock's SDPA), not a measurement."""
    import importlib.util

    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    if config == "zero3" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("needs deepspeed")
    two = run_two_processes(tiny_model, tmp_path / "two", config=config, device="cuda")
    stock = script.run(script_args(tiny_model, tmp_path / "stock", per_device_batch=2, trainer="stock", device="cuda"))
    assert [result["num_processes"] for result in two] == [2, 2]
    assert_same_steps(two[0], stock, f"{config}: 2 GPUs vs stock on 1", tolerance=1e-4)
