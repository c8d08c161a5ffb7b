"""Ranked-list reward modelling: stock ``trl.RewardTrainer`` on pairs vs ``PrefixSharedRewardTrainer`` on lists.

A special case ``trl-prefix-share bench --trainer reward`` does not cover (it feeds both sides the same pairs):

- ``ranked`` (default): data with repeated prompts (PandaLM) turned into ranked lists of ``--responses`` (K) responses
  per prompt (``ranked_from_pairs``). Ours trains on the lists, ``--batch-size`` prompts per step; stock on the
  binarized ``K (K - 1) / 2`` pairs of the same prompts, ``--batch-size x K (K - 1) / 2`` pairs per step, in the same
  order (sequential sampling on both sides), so both optimise the same loss on the same pairs at every step.
- ``pairs``: TRL's pairwise data (HH harmless), both trainers on the same pairs, in order.

Runs alternate (stock, ours, stock, ...) in one process from the same randomly initialised model and config (CPU,
fp32); timing, token counts and peak memory are ``trl_prefix_share.commands.bench``'s.

Example::

    OMP_NUM_THREADS=1 python benchmarks/bench_reward.py --mode ranked --json /tmp/reward_ranked.json
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
from transformers import AutoTokenizer, PreTrainedTokenizerBase  # noqa: E402
from trl import RewardConfig, RewardTrainer  # noqa: E402

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
from trl_prefix_share.trainers.reward.ranked import binarize_ranked, ranked_from_pairs  # noqa: E402
from trl_prefix_share.trainers.reward.trainer import PrefixSharedRewardTrainer  # noqa: E402

DEFAULT_DATA = {
    "pairs": SHARED / "data" / "hh_harmless_base_test.jsonl",
    "ranked": SHARED / "data" / "pandalm_human_testset.jsonl",
}


def datasets_for(args: argparse.Namespace) -> tuple[Dataset, Dataset, int]:
    """(stock dataset, our dataset, stock batch size) for the mode; ours uses ``args.batch_size``."""
    rows = load_rows(str(args.dataset or DEFAULT_DATA[args.mode]))
    steps = args.warmup + args.steps
    if args.mode == "pairs":
        picked = Dataset.from_list(rows[: args.batch_size * steps])
        return picked, picked, args.batch_size
    k = args.responses
    ranked = [e for e in ranked_from_pairs(rows) if len(e["responses"]) >= k]
    ranked = [{"prompt": e["prompt"], "responses": e["responses"][:k]} for e in ranked][: args.batch_size * steps]
    if len(ranked) < args.batch_size * steps:
        raise SystemExit(f"only {len(ranked)} prompts with >= {k} responses; lower --steps or --batch-size")
    pairs = [pair for example in ranked for pair in binarize_ranked(example)]
    return Dataset.from_list(pairs), Dataset.from_list(ranked), args.batch_size * k * (k - 1) // 2


def run_once(
    name: str, args: argparse.Namespace, model_dir: str, tokenizer: PreTrainedTokenizerBase, data: Dataset, batch: int
) -> TrainMeasurement:
    """One ``train()`` of stock or ours; sequential sampling so batch i trains step i on both sides."""
    settings = BenchSettings(
        batch_size=batch, steps=args.steps, warmup=args.warmup, max_length=args.max_length, seed=args.seed, device="cpu"
    )
    trainer_class = RewardTrainer if name == "stock" else PrefixSharedRewardTrainer
    with tempfile.TemporaryDirectory(prefix="bench-rm-out-") as output_dir:
        config = RewardConfig(**common_config(settings, output_dir, True), train_sampling_strategy="sequential")
        trainer = trainer_class(model=model_dir, args=config, train_dataset=data, processing_class=tokenizer)
        return measured_train(trainer, PeakMemory(torch.device("cpu")), args.warmup, args.steps)


def summarize(runs: dict[str, list[TrainMeasurement]], steps: int) -> dict[str, Any]:
    """Medians, best of rounds (per step index, the fastest round), tokens, peak memory and the ratios to stock."""
    summary: dict[str, Any] = {}
    for name, results in runs.items():
        summary[f"{name}_median_s"] = statistics.median(s for r in results for s in r.step_seconds)
        summary[f"{name}_best_s"] = sum(min(t) for t in zip(*(r.step_seconds for r in results), strict=True)) / steps
        summary[f"{name}_tokens_per_step"] = results[0].tokens_per_step
        peaks = [r.peak_memory_mib for r in results if r.peak_memory_mib is not None]
        summary[f"{name}_peak_mib"] = max(peaks) if peaks else None
    summary["speed_ratio"] = summary["stock_median_s"] / summary["ours_median_s"]
    summary["best_speed_ratio"] = summary["stock_best_s"] / summary["ours_best_s"]
    summary["token_ratio"] = summary["stock_tokens_per_step"] / summary["ours_tokens_per_step"]
    return summary


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} MiB"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("pairs", "ranked"), default="ranked")
    parser.add_argument("--dataset", type=Path, default=None, help="JSONL data (default depends on --mode)")
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    parser.add_argument("--responses", type=int, default=4, help="ranked mode: responses per prompt")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs (pairs mode) or prompts (ranked mode)")
    add_small_run_flags(parser)
    return parse_small_run(parser, argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    stock_data, our_data, stock_batch = datasets_for(args)
    shape = ModelShape(layers=args.layers, hidden=args.hidden, heads=args.heads, kv_heads=args.heads)
    model_dir = build_model_dir(shape, tokenizer, reward=True, seed=args.seed, dtype=torch.float32)
    print(
        f"mode {args.mode}: stock {stock_batch} pairs/step, ours {args.batch_size} "
        f"{'prompts' if args.mode == 'ranked' else 'pairs'}/step; RM {shape.describe()}, fp32 CPU, "
        f"{torch.get_num_threads()} threads; {args.rounds} rounds x {args.steps} steps (+{args.warmup} warm-up); "
        f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}"
    )
    inputs = {"stock": (stock_data, stock_batch), "ours": (our_data, args.batch_size)}
    runs = alternating_rounds(
        list(inputs), args.rounds, lambda name: run_once(name, args, model_dir, tokenizer, *inputs[name])
    )
    summary = summarize(runs, args.steps)
    print(
        f"\ntokens/step: stock {summary['stock_tokens_per_step']:.0f}, ours {summary['ours_tokens_per_step']:.0f} "
        f"(ratio {summary['token_ratio']:.2f}x)\n"
        f"median step: stock {summary['stock_median_s']:.3f} s, ours {summary['ours_median_s']:.3f} s "
        f"(speed ratio {summary['speed_ratio']:.2f}x; same steps, best of rounds: {summary['best_speed_ratio']:.2f}x)\n"
        f"peak memory: stock {_mib(summary['stock_peak_mib'])}, ours {_mib(summary['ours_peak_mib'])}"
    )
    write_small_run_json(args, summary, runs)


if __name__ == "__main__":
    main()
