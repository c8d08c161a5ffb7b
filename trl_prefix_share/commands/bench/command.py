"""`trl-prefix-share bench`: command-line flags -> `BenchSettings` -> table, JSON and PNG."""

from __future__ import annotations

import argparse
import json
import os
import warnings
from dataclasses import asdict
from pathlib import Path

from trl_prefix_share.commands.bench.data import DEFAULT_TOKENIZER, SHORT_NAMES
from trl_prefix_share.commands.bench.models import PRESETS, ModelShape
from trl_prefix_share.commands.bench.online import ONLINE_KINDS, PROMPT_SETS
from trl_prefix_share.commands.bench.trainers import DEFAULT_VARIANTS, KINDS, VARIANTS
from trl_prefix_share.commands.bench.vision import VISION_DATASETS

EXAMPLE = """examples:
  trl-prefix-share bench --trainer dpo --dataset hh_harmless ultrafeedback --json out.json --plot out.png
  trl-prefix-share bench --trainer dpo orpo simpo reward --variants stock ours
  trl-prefix-share bench --model-preset qwen2.5-0.5b --dataset my_prefs.jsonl --tokenizer Qwen/Qwen2.5-0.5B
  trl-prefix-share bench --trainer dpo --dataset shapes --variants stock unshared ours
    (image preferences: charts and shapes drawn with PIL, a Qwen2.5-VL-shaped model, 144 image tokens per image)
  trl-prefix-share bench --trainer grpo rloo --model-preset smollm-135m --json online.json
    (online RL: prompt sets ultrafeedback-long and pandalm-short by default; G = --num-generations)
  trl-prefix-share bench --sweep --trainer dpo grpo --prompt-lengths 256 1024 4096 16384 --completions 2 4 8 16 \
      --json sweep.json --plot sweep.png
    (scaling sweep: prompt length x completions per prompt, stock vs packed-unshared vs ours; see docs/benchmarks.md)
"""


def add_small_run_flags(parser: argparse.ArgumentParser) -> None:
    """The run-size flags the special-case scripts in `benchmarks/` share (steps, rounds, model shape, seed, JSON)."""
    parser.add_argument("--steps", type=int, default=4, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of every run")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--json", type=Path, default=None, help="write every measurement to this JSON file")


def parse_small_run(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, check the run sizes, and quiet the libraries' progress bars and notices."""
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        parser.error("--warmup, --steps and --rounds must be >= 1")
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    return args


def write_small_run_json(args: argparse.Namespace, summary: dict, runs: dict[str, list]) -> None:
    """`--json` of the special-case scripts: their flags, summary, and every run (trainer name -> one per round)."""
    if args.json is None:
        return
    payload = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "summary": summary,
        "runs": [{"trainer": t, "round": i, **asdict(r)} for t, rs in runs.items() for i, r in enumerate(rs)],
    }
    args.json.write_text(json.dumps(payload, indent=2))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trl-prefix-share bench",
        description="Time stock TRL and prefix sharing end to end (trainer.train()) in one process, alternating runs.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--trainer", nargs="+", choices=KINDS + ONLINE_KINDS, default=["dpo"], help="trainer kinds (not mixed)"
    )
    parser.add_argument(
        "--dataset",
        nargs="+",
        default=["hh_harmless"],
        help=f"short names ({', '.join(SHORT_NAMES)}: the repository's sample files; {', '.join(VISION_DATASETS)}: "
        "generated image preferences, with a Qwen2.5-VL-shaped model), local files or hub names",
    )
    parser.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER), help="tokenizer name or directory")
    parser.add_argument("--model", default=None, help="a model name or directory (default: built from a config)")
    parser.add_argument(
        "--model-preset",
        choices=sorted(PRESETS),
        default=None,
        help="shape of the built model (default: tiny; smollm-135m for grpo/rloo)",
    )
    parser.add_argument("--family", default=None, help="override the preset's model_type (llama, qwen2, ...)")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        default=None,
        help="ablation cells (default: all offline; stock and ours online, one_level on request)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="per_device_train_batch_size (pairs)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of every run")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds over the variants")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--gradient-checkpointing", choices=("on", "off", "both"), default="on", help="on: TRL default")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda[:N]")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--whole-file", action=argparse.BooleanOptionalAction, default=True, help="token limits over the whole file"
    )
    parser.add_argument("--json", type=Path, default=None, help="write every measurement to this JSON file")
    parser.add_argument("--plot", type=Path, default=None, help="write a bar chart (PNG; needs matplotlib)")
    online = parser.add_argument_group("online RL (--trainer grpo rloo)")
    online.add_argument("--num-generations", type=int, default=8, help="completions per prompt (G)")
    online.add_argument("--prompts-per-step", type=int, default=2, help="prompts per step (batch = this x G)")
    online.add_argument("--max-completion-length", type=int, default=32)
    online.add_argument("--beta", type=float, default=0.0, help="KL coefficient (> 0 adds the reference pass)")
    sweep = parser.add_argument_group("scaling sweep (--sweep; --trainer dpo grpo)")
    sweep.add_argument("--sweep", action="store_true", help="run the prompt-length x completions grid")
    sweep.add_argument("--prompt-lengths", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    sweep.add_argument("--completions", type=int, nargs="+", default=[2, 4, 8, 16], help="per prompt (DPO: even)")
    sweep.add_argument("--completion-length", type=int, default=64, help="tokens per completion")
    sweep.add_argument("--time-cap", type=float, default=300.0, help="seconds per run before it is reported as over")
    return parser


def shape_from(args: argparse.Namespace) -> ModelShape:
    """The preset with any explicit overrides."""
    preset = PRESETS[args.model_preset or "tiny"]
    heads = args.heads or preset.heads
    return ModelShape(
        family=args.family or preset.family,
        layers=args.layers or preset.layers,
        hidden=args.hidden or preset.hidden,
        heads=heads,
        kv_heads=heads if args.heads else preset.kv_heads,
        intermediate=None if args.hidden else preset.intermediate,
        tie_embeddings=preset.tie_embeddings,
        extra_config=preset.extra_config if (args.family or preset.family) == preset.family else (),
    )


def run_bench(argv: list[str]) -> None:
    """Parse flags, run, print the table, and write JSON / PNG when asked."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        parser.error("--warmup, --steps and --rounds must be >= 1")
    if args.sweep:
        run_sweep_command(parser, args)
        return
    online = [kind for kind in args.trainer if kind in ONLINE_KINDS]
    if online and len(online) != len(args.trainer):
        parser.error("online (grpo, rloo) and preference trainers run separately: give one group to --trainer")
    args.model_preset = args.model_preset or ("smollm-135m" if online else "tiny")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notes, once per run
    import torch

    from trl_prefix_share.commands.bench.report import format_table, plot, summarize, write_json
    from trl_prefix_share.commands.bench.runner import BenchSettings, run_benchmark

    if args.threads:
        torch.set_num_threads(args.threads)
    if online:
        run_online(args)
        return
    settings = BenchSettings(
        trainers=args.trainer,
        datasets=args.dataset,
        variants=args.variants or list(DEFAULT_VARIANTS),
        tokenizer=args.tokenizer,
        model=args.model,
        shape=shape_from(args),
        batch_size=args.batch_size,
        steps=args.steps,
        warmup=args.warmup,
        rounds=args.rounds,
        max_length=args.max_length,
        gradient_checkpointing={"on": [True], "off": [False], "both": [True, False]}[args.gradient_checkpointing],
        seed=args.seed,
        device=args.device,
        whole_file=args.whole_file,
    )
    model = settings.model_description()
    print(
        f"[trl-prefix-share bench] {model}, batch {settings.batch_size}, {settings.rounds} rounds x {settings.steps} "
        f"timed steps (+{settings.warmup} warm-up), variants {', '.join(settings.variants)}",
        flush=True,
    )
    report = run_benchmark(settings, log=lambda line: print(line, flush=True))
    summaries = summarize(report)
    env = report.environment
    versions = f"torch {env['torch']}, transformers {env['transformers']}, trl {env['trl']}"
    print(f"\n{env['device']}, {env['dtype']}; {versions}")
    print(format_table(report, summaries))
    if args.json is not None:
        write_json(report, summaries, args.json)
        print(f"\nJSON: {args.json}")
    if args.plot is not None:
        try:
            plot(report, summaries, args.plot)
            print(f"chart: {args.plot}")
        except ImportError:
            print("chart skipped: matplotlib is not installed (pip install 'trl-prefix-share[plot]')")


def run_online(args: argparse.Namespace) -> None:
    """`--trainer grpo rloo`: the online benchmark (its own table and JSON; no chart)."""
    import transformers

    from trl_prefix_share.commands.bench.online import (
        ONLINE_VARIANTS,
        OnlineSettings,
        format_online_table,
        online_payload,
        run_online_benchmark,
        summarize_online,
    )

    transformers.logging.set_verbosity_error()
    datasets = args.dataset if args.dataset != ["hh_harmless"] else list(PROMPT_SETS)
    settings = OnlineSettings(
        trainers=args.trainer,
        datasets=datasets,
        tokenizer=args.tokenizer,
        model=args.model,
        shape=shape_from(args),
        num_generations=args.num_generations,
        prompts_per_step=args.prompts_per_step,
        max_completion_length=args.max_completion_length,
        steps=args.steps,
        warmup=args.warmup,
        rounds=args.rounds,
        beta=args.beta,
        gradient_checkpointing=args.gradient_checkpointing != "off",
        seed=args.seed,
        device=args.device,
        variants=tuple(v for v in ONLINE_VARIANTS if v in (args.variants or ("stock", "ours"))),
    )
    model = settings.model or settings.shape.describe()
    print(f"[trl-prefix-share bench] online RL, {model}, {settings.rounds} rounds x {settings.steps} steps", flush=True)
    runs = run_online_benchmark(settings, log=lambda line: print(line, flush=True))
    cells = summarize_online(runs)
    print(format_online_table(settings, cells))
    if args.json is not None:
        args.json.write_text(json.dumps(online_payload(settings, runs, cells), indent=2, default=str))
        print(f"\nJSON: {args.json}")


def run_sweep_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """`--sweep`: the scaling grid (its own table, JSON and plots)."""
    from trl_prefix_share.commands.bench.sweep import (
        SWEEP_KINDS,
        SWEEP_VARIANTS,
        SweepSettings,
        format_sweep_table,
        plot_sweep,
        run_sweep,
        write_sweep_json,
    )

    if not set(args.trainer) <= set(SWEEP_KINDS):
        parser.error(f"--sweep runs {' and '.join(SWEEP_KINDS)}; got --trainer {' '.join(args.trainer)}")
    if "dpo" in args.trainer and any(n < 2 or n % 2 for n in args.completions):
        parser.error("--sweep with dpo: --completions must be even (n responses = n/2 pairs)")
    if args.variants and not set(args.variants) <= set(SWEEP_VARIANTS):
        parser.error(f"--sweep runs the variants {', '.join(SWEEP_VARIANTS)}; got {' '.join(args.variants)}")
    import datasets
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.model_preset = args.model_preset or "smollm-135m"
    settings = SweepSettings(
        kinds=args.trainer,
        prompt_lengths=args.prompt_lengths,
        completions=args.completions,
        completion_length=args.completion_length,
        variants=list(args.variants or SWEEP_VARIANTS),
        tokenizer=args.tokenizer,
        model=args.model,
        shape=shape_from(args),
        steps=args.steps,
        warmup=args.warmup,
        time_cap_s=args.time_cap,
        gradient_checkpointing=args.gradient_checkpointing != "off",
        seed=args.seed,
        device=args.device,
    )
    model = settings.model or settings.shape.describe()
    print(f"[trl-prefix-share bench] sweep, {model}, {settings.steps} timed step(s) per run", flush=True)
    result = run_sweep(settings, log=lambda line: print(line, flush=True))
    env = result["environment"]
    print(f"\n{env['device']}, {env['dtype']}; torch {env['torch']}, transformers {env['transformers']}")
    print(format_sweep_table(result))
    if args.json is not None:
        write_sweep_json(result, args.json)
        print(f"\nJSON: {args.json}")
    if args.plot is not None:
        plot_sweep(result, args.plot)
        print(f"plots: {args.plot}")
