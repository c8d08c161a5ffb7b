"""Hybrid DPO: the state-carrying mixers on the unpadded run vs the padded run, side by side in one process.

``PrefixSharedDPOTrainer`` on a hybrid preset (default ``nemotron-h-scaled``: Mamba2 mixers, MLPs and a few attention
layers) in five layouts over the same batches: packed but unshared (``share_prefix=False``, the padding-free baseline),
shared with the mixers forced onto the padded run (one-level layouts, as before Mamba2 had the unpadded run), shared on
the unpadded run with one-level layouts, prefix trees merging every common token (``trees_min1``:
``prefix_tree_min_shared_tokens=1``, the rule before the minimum), and the default (unpadded run, prefix trees with
their default minimum). Runs alternate in one process
from the same randomly initialised model (CPU, fp32, gradient checkpointing as TRL's default); timing, tokens and peak
memory are ``trl_prefix_share.commands.bench``'s. The padded variant replaces the recipe reader for its run only.

Example::

    OMP_NUM_THREADS=2 python benchmarks/bench_mixer_runs.py --dataset hh_harmless --json /tmp/mixer_runs.json
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
from typing import Any
from unittest import mock

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from trl_prefix_share import PrefixSharedDPOConfig, PrefixSharedDPOTrainer  # noqa: E402
from trl_prefix_share.commands.bench.command import (  # noqa: E402
    add_small_run_flags,
    parse_small_run,
    write_small_run_json,
)
from trl_prefix_share.commands.bench.data import DEFAULT_TOKENIZER, load_rows  # noqa: E402
from trl_prefix_share.commands.bench.measure import (  # noqa: E402
    PeakMemory,
    TrainMeasurement,
    alternating_rounds,
    measured_train,
)
from trl_prefix_share.commands.bench.models import PRESETS, build_model_dir  # noqa: E402
from trl_prefix_share.commands.bench.runner import BenchSettings, common_config  # noqa: E402
from trl_prefix_share.core.mixers import ragged  # noqa: E402
from trl_prefix_share.core.tree_support import tree_refusal  # noqa: E402

#: name -> (PrefixSharedDPOConfig fields, mixers forced onto the padded run)
VARIANTS: dict[str, tuple[dict[str, Any], bool]] = {
    "unshared": ({"share_prefix": False, "prefix_tree": False}, False),
    "padded": ({"prefix_tree": False}, True),
    "unpadded": ({"prefix_tree": False}, False),
    "trees_min1": ({"prefix_tree_min_shared_tokens": 1}, False),
    "ours": ({}, False),
}


@contextlib.contextmanager
def mixer_run(padded: bool):
    """Inside: every mixer's recipe reads as refused (the padded run, and so one-level layouts), when ``padded``."""
    if not padded:
        yield
        return
    with mock.patch.object(ragged, "ragged_recipe", lambda module_class: "forced onto the padded run (benchmark)"):
        yield


def run_once(name: str, args: argparse.Namespace, model_dir: str, tokenizer, dataset: Dataset) -> TrainMeasurement:
    fields, padded = VARIANTS[name]
    settings = BenchSettings(
        batch_size=args.batch_size,
        steps=args.steps,
        warmup=args.warmup,
        max_length=args.max_length,
        seed=args.seed,
        device="cpu",
    )
    with tempfile.TemporaryDirectory(prefix="bench-mixer-runs-") as output_dir, mixer_run(padded):
        config = PrefixSharedDPOConfig(**common_config(settings, output_dir, True), **fields)
        trainer = PrefixSharedDPOTrainer(
            model=model_dir, args=config, train_dataset=dataset, processing_class=tokenizer
        )
        if padded != (tree_refusal(trainer.model) is not None):  # None: every mixer has its unpadded recipe
            raise RuntimeError(f"{name}: the mixers do not take the intended run")
        return measured_train(trainer, PeakMemory(torch.device("cpu")), args.warmup, args.steps)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="hh_harmless", help="a shared set's name or a JSONL preference file")
    parser.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER))
    parser.add_argument("--model-preset", default="nemotron-h-scaled", choices=sorted(PRESETS))
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        default=list(VARIANTS),
        help="layouts to run (unshared is the baseline; a dense preset has no padded run: leave `padded` out)",
    )
    add_small_run_flags(parser)  # its --layers / --hidden / --heads are unused: the preset sets the shape
    return parse_small_run(parser, argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    dataset = Dataset.from_list(load_rows(args.dataset))
    shape = PRESETS[args.model_preset]
    model_dir = build_model_dir(shape, tokenizer, reward=False, seed=args.seed, dtype=torch.float32)
    print(
        f"data {args.dataset} ({len(dataset)} pairs), batch {args.batch_size}, {shape.describe()}, fp32 CPU, "
        f"{torch.get_num_threads()} threads; {args.rounds} rounds x {args.steps} steps (+{args.warmup} warm-up); "
        f"torch {torch.__version__}, transformers {transformers.__version__}"
    )
    runs = alternating_rounds(
        ["unshared", *(name for name in args.variants if name != "unshared")],
        args.rounds,
        lambda name: run_once(name, args, model_dir, tokenizer, dataset),
    )
    summary: dict[str, dict[str, Any]] = {}
    for name, results in runs.items():
        seconds = sum(s for r in results for s in r.step_seconds)
        tokens = sum(r.tokens_per_step * len(r.step_seconds) for r in results)
        summary[name] = {
            "seconds": seconds,
            "tokens": tokens,
            "median_s": statistics.median(s for r in results for s in r.step_seconds),
        }
    base = summary["unshared"]
    print(f"\n{'variant':<12}{'s/step':>9}{'tokens/step':>13}{'vs unshared':>13}{'token limit':>13}{'of limit':>10}")
    steps = args.rounds * args.steps
    for name, row in summary.items():
        speed = base["seconds"] / row["seconds"]
        limit = base["tokens"] / row["tokens"]
        row.update(speedup=speed, token_limit=limit, share_of_limit=speed / limit)
        print(
            f"{name:<12}{row['seconds'] / steps:>9.2f}{row['tokens'] / steps:>13.0f}{speed:>12.2f}x{limit:>12.2f}x"
            f"{speed / limit:>10.2f}"
        )
    print("ratios of sums over all timed steps; 'of limit': the speed-up over unshared / its token ratio")
    write_small_run_json(args, summary, runs)


if __name__ == "__main__":
    main()
