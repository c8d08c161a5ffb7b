"""Prompt-grouped DPO on data with repeated prompts: stock ``trl.DPOTrainer`` vs ``PrefixSharedDPOTrainer`` (one
document per pair) vs ``GroupedPrefixSharedDPOTrainer`` (one document per prompt).

A special case ``trl-prefix-share bench --trainer dpo`` does not cover: all three trainers are fed the prompt-grouped
order of ``PromptGroupedSampler`` (stock and the per-pair trainer are given it too), so they see the same batches and
the comparison isolates the layout. Data: PandaLM (842 comparisons over 153 prompts, up to 10 pairs per prompt), or
any JSONL preference file with repeated prompts. Runs alternate in one process from the same randomly initialised
model and config (CPU, fp32); timing, token counts and peak memory are ``trl_prefix_share.commands.bench``'s.

Example::

    OMP_NUM_THREADS=1 python benchmarks/bench_grouped_dpo.py --json /tmp/grouped_dpo.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from torch.utils.data import Sampler  # noqa: E402
from transformers import AutoTokenizer, PreTrainedTokenizerBase  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from trl_prefix_share import PrefixSharedDPOTrainer  # noqa: E402
from trl_prefix_share.commands.bench.command import (  # noqa: E402
    add_small_run_flags,
    parse_small_run,
    write_small_run_json,
)
from trl_prefix_share.commands.bench.data import DEFAULT_TOKENIZER, SHARED, load_rows  # noqa: E402
from trl_prefix_share.commands.bench.measure import (  # noqa: E402
    PeakMemory,
    TrainMeasurement,
    alternating_rounds,
    measured_train,
)
from trl_prefix_share.commands.bench.models import ModelShape, build_model_dir  # noqa: E402
from trl_prefix_share.commands.bench.runner import BenchSettings, common_config  # noqa: E402
from trl_prefix_share.trainers.dpo.grouped import GroupedPrefixSharedDPOTrainer  # noqa: E402
from trl_prefix_share.trainers.dpo.grouping import prompt_grouped_sampler  # noqa: E402

DEFAULT_DATASET = SHARED / "data" / "pandalm_human_testset.jsonl"


class _GroupedOrder:
    """Mixin: train in the grouped trainer's prompt-grouped order, so every trainer sees the same batches."""

    def _get_train_sampler(self, train_dataset: Dataset | None = None) -> Sampler:
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return prompt_grouped_sampler(train_dataset or self.train_dataset, self._train_batch_size, seed)


class StockSameOrder(_GroupedOrder, DPOTrainer):
    pass


class PairsSameOrder(_GroupedOrder, PrefixSharedDPOTrainer):
    pass


TRAINERS = {"stock": StockSameOrder, "pairs": PairsSameOrder, "grouped": GroupedPrefixSharedDPOTrainer}


def run_once(
    name: str, args: argparse.Namespace, model_dir: str, tokenizer: PreTrainedTokenizerBase, dataset: Dataset
) -> TrainMeasurement:
    """One ``train()`` of one of ``TRAINERS``."""
    settings = BenchSettings(
        batch_size=args.batch_size,
        steps=args.steps,
        warmup=args.warmup,
        max_length=args.max_length,
        seed=args.seed,
        device="cpu",
    )
    with tempfile.TemporaryDirectory(prefix="bench-gdpo-out-") as output_dir:
        config = DPOConfig(**common_config(settings, output_dir, True))
        trainer = TRAINERS[name](model=model_dir, args=config, train_dataset=dataset, processing_class=tokenizer)
        return measured_train(trainer, PeakMemory(torch.device("cpu")), args.warmup, args.steps)


def summarize(runs: dict[str, list[TrainMeasurement]], steps: int) -> dict[str, dict[str, Any]]:
    """Per trainer: median, best of rounds (per step index, the fastest round), tokens, peak and ratios to stock."""
    summary: dict[str, dict[str, Any]] = {}
    for name, results in runs.items():
        peaks = [r.peak_memory_mib for r in results if r.peak_memory_mib is not None]
        summary[name] = {
            "median_s": statistics.median(s for r in results for s in r.step_seconds),
            "best_s": sum(min(t) for t in zip(*(r.step_seconds for r in results), strict=True)) / steps,
            "tokens_per_step": results[0].tokens_per_step,
            "peak_mib": max(peaks) if peaks else None,
        }
    for row in summary.values():
        row["speed_ratio"] = summary["stock"]["median_s"] / row["median_s"]
        row["token_ratio"] = summary["stock"]["tokens_per_step"] / row["tokens_per_step"]
    return summary


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} MiB"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    add_small_run_flags(parser)
    return parse_small_run(parser, argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    dataset = Dataset.from_list(load_rows(str(args.dataset)))
    shape = ModelShape(layers=args.layers, hidden=args.hidden, heads=args.heads, kv_heads=args.heads)
    model_dir = build_model_dir(shape, tokenizer, reward=False, seed=args.seed, dtype=torch.float32)
    print(
        f"data {args.dataset.name} ({len(dataset)} pairs), batch {args.batch_size} pairs in prompt-grouped order, "
        f"{shape.describe()}, fp32 CPU, {torch.get_num_threads()} threads; {args.rounds} rounds x {args.steps} steps "
        f"(+{args.warmup} warm-up); torch {torch.__version__}, transformers {transformers.__version__}, "
        f"trl {trl.__version__}"
    )
    runs = alternating_rounds(
        list(TRAINERS), args.rounds, lambda name: run_once(name, args, model_dir, tokenizer, dataset)
    )
    summary = summarize(runs, args.steps)
    header = f"{'trainer':<10}{'median s/step':>15}{'best s/step':>13}{'tokens/step':>13}{'peak MiB':>10}"
    print(f"\n{header}{'speed':>8}{'tokens':>8}")
    for name, row in summary.items():
        peak = "-" if row["peak_mib"] is None else f"{row['peak_mib']:.0f}"
        print(
            f"{name:<10}{row['median_s']:>15.3f}{row['best_s']:>13.3f}{row['tokens_per_step']:>13.0f}{peak:>10}"
            f"{row['speed_ratio']:>7.2f}x{row['token_ratio']:>7.2f}x"
        )
    write_small_run_json(args, summary, runs)


if __name__ == "__main__":
    main()
