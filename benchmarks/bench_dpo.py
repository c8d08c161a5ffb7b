"""Side-by-side end-to-end benchmark: stock ``trl.DPOTrainer`` vs ``PrefixSharedDPOTrainer``.

Both trainers run ``trainer.train()`` on the same data, tokenizer, initial model (saved to a temporary directory and
passed as a path, so TRL builds the reference model itself), seed and config, in one process. Runs alternate
(stock, ours, stock, ours, ...) so that machine drift cancels. The first ``--warmup`` steps of every run are not
timed. A step is timed from the end of the previous step to the end of this one, so it includes everything the
trainer does for it: fetching and collating the batch (our layout building), the policy and reference forwards,
backward, optimizer, scheduler and logging.

Tokens per step: ours from ``trainer.prefix_share_totals`` (packed-row tokens, and stock's padded tokens for the
same examples); stock from its own collated batches (``input_ids.numel()``). The *token limit* is stock tokens / our
tokens: the speed-up we would get if step time were proportional to tokens.

Example::

    python benchmarks/bench_dpo.py                      # TRL defaults (gradient checkpointing on)
    python benchmarks/bench_dpo.py --gradient-checkpointing both --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import (  # noqa: E402
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
    TrainerCallback,
)
from transformers.trainer_callback import PrinterCallback, ProgressCallback  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from trl_prefix_share import PrefixSharedDPOTrainer  # noqa: E402
from trl_prefix_share.collator import PACKED_KEY  # noqa: E402

SHARED = Path(os.environ.get("TRL_PREFIX_SHARE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
DEFAULT_DATASET = SHARED / "data" / "hh_harmless_base_test.jsonl"
DEFAULT_TOKENIZER = SHARED / "tokenizers" / "smollm"
TRAINERS: dict[str, type[DPOTrainer]] = {"stock": DPOTrainer, "ours": PrefixSharedDPOTrainer}


@dataclass
class RunResult:
    """Measurements of one ``trainer.train()`` run."""

    trainer: str
    gradient_checkpointing: bool
    step_seconds: list[float]
    cpu_seconds: list[float]
    tokens_per_step: float
    stock_tokens_per_step: float
    lm_head_positions_per_step: float
    setup_seconds: float


@dataclass
class Summary:
    """Aggregate of all runs of one setting (one gradient-checkpointing value)."""

    gradient_checkpointing: bool
    stock_median_s: float
    ours_median_s: float
    stock_cpu_median_s: float
    ours_cpu_median_s: float
    speed_ratio: float
    mean_speed_ratio: float
    paired_best_speed_ratio: float
    stock_tokens_per_step: float
    ours_tokens_per_step: float
    token_limit: float
    share_of_token_limit: float
    stock_lm_head_positions_per_step: float
    ours_lm_head_positions_per_step: float
    per_round_speed_ratio: list[float] = field(default_factory=list)


class StepTimer(TrainerCallback):
    """Records wall and CPU time at the end of every optimizer step, and the trainer's token totals at that moment."""

    def __init__(self, trainer: DPOTrainer) -> None:
        self.trainer = trainer
        self.step_ends: list[float] = []
        self.cpu_ends: list[float] = []
        self.token_marks: list[tuple[int, int]] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.step_ends.append(time.perf_counter())
        self.cpu_ends.append(time.process_time())
        totals = getattr(self.trainer, "prefix_share_totals", None)
        self.token_marks.append((totals["tokens"], totals["stock_tokens"]) if totals else (0, 0))


class CountingCollator:
    """Wraps a collator and records, for every batch it builds in order, its padded tokens (``input_ids.numel()``)
    and the positions the LM head scores.

    Off Triton devices (so here, on CPU) TRL's fused LM head scores every position of the stock padded batch:
    ``rows * (L - 1)``. Ours scores only labelled positions (``label_index``).
    """

    def __init__(self, collator: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> None:
        self.collator = collator
        self.counts: list[int] = []
        self.lm_head_positions: list[int] = []

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(examples)
        rows, length = batch["input_ids"].shape
        self.counts.append(rows * length)
        packed = batch.get(PACKED_KEY)
        self.lm_head_positions.append(rows * (length - 1) if packed is None else int(packed["label_index"].numel()))
        return batch


def load_rows(path: Path) -> list[dict[str, Any]]:
    """All rows of a JSONL preference file (any TRL preference format)."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def sample_rows(rows: list[dict[str, Any]], count: int, seed: int) -> Dataset:
    """A seeded random sample of ``count`` rows (all rows if fewer), so timed batches represent the whole file."""
    picked = random.Random(seed).sample(rows, min(count, len(rows)))
    return Dataset.from_list(picked)


def dataset_token_limit(
    args: argparse.Namespace, model_dir: str, tokenizer: PreTrainedTokenizerBase, rows: list[dict[str, Any]]
) -> tuple[float, float, int]:
    """Stock and packed tokens per step over every batch of the whole file (collation only, no model step)."""
    with tempfile.TemporaryDirectory(prefix="bench-dpo-out-") as output_dir:
        trainer = PrefixSharedDPOTrainer(
            model=model_dir,
            args=make_config(args, output_dir, gradient_checkpointing=True),
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )
        stock = ours = batches = 0
        for batch in trainer.get_train_dataloader():
            stock += batch["input_ids"].numel()
            ours += batch[PACKED_KEY]["input_ids"].numel()
            batches += 1
    return stock / batches, ours / batches, batches


def build_model_dir(tokenizer: PreTrainedTokenizerBase, layers: int, hidden: int, heads: int, seed: int) -> str:
    """Save a randomly initialised fp32 Llama (and the tokenizer) to a temporary directory; return its path."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    path = tempfile.mkdtemp(prefix="bench-dpo-model-")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_config(args: argparse.Namespace, output_dir: str, gradient_checkpointing: bool) -> DPOConfig:
    """The same DPOConfig for both trainers: TRL defaults except CPU/fp32/no reporting and the step count."""
    return DPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=args.batch_size,
        max_steps=args.warmup + args.steps,
        max_length=args.max_length,
        gradient_checkpointing=gradient_checkpointing,
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=args.seed,
        data_seed=args.seed,
    )


def run_once(
    name: str,
    args: argparse.Namespace,
    model_dir: str,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    gradient_checkpointing: bool,
) -> RunResult:
    """Build one trainer, train it, and return its timed steps and token counts."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-dpo-out-") as output_dir:
        trainer = TRAINERS[name](
            model=model_dir,
            args=make_config(args, output_dir, gradient_checkpointing),
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        for callback in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(callback)
        counter = CountingCollator(trainer.data_collator)
        trainer.data_collator = counter
        timer = StepTimer(trainer)
        trainer.add_callback(timer)
        setup = time.perf_counter() - started
        trainer.train()
    ends = timer.step_ends
    if len(ends) != args.warmup + args.steps:
        raise RuntimeError(f"{name}: expected {args.warmup + args.steps} steps, got {len(ends)}")
    step_seconds = _intervals(ends, args.warmup)
    cpu_seconds = _intervals(timer.cpu_ends, args.warmup)
    if name == "ours":
        first, last = timer.token_marks[args.warmup - 1], timer.token_marks[-1]
        tokens = (last[0] - first[0]) / args.steps
        stock_tokens = (last[1] - first[1]) / args.steps
    else:
        timed = counter.counts[args.warmup : args.warmup + args.steps]
        tokens = stock_tokens = sum(timed) / args.steps
    # The dataloader may collate one batch ahead: the trained batches are the first ones collated.
    lm_positions = sum(counter.lm_head_positions[args.warmup : args.warmup + args.steps]) / args.steps
    timer.trainer = None
    return RunResult(name, gradient_checkpointing, step_seconds, cpu_seconds, tokens, stock_tokens, lm_positions, setup)


def _intervals(marks: list[float], warmup: int) -> list[float]:
    """Durations of the steps after the first ``warmup`` ones, from consecutive end-of-step marks."""
    return [b - a for a, b in zip(marks[warmup - 1 : -1], marks[warmup:], strict=True)]


def _best_per_step(runs: list[RunResult]) -> list[float]:
    """Fastest time of each step index over the rounds: step i trains the same batch in every run (same seed)."""
    return [min(times) for times in zip(*(r.step_seconds for r in runs), strict=True)]


def summarize(results: list[RunResult], gradient_checkpointing: bool) -> Summary:
    """Median step time of each trainer over all its timed steps, and the ratios."""
    runs = [r for r in results if r.gradient_checkpointing == gradient_checkpointing]
    stock = [r for r in runs if r.trainer == "stock"]
    ours = [r for r in runs if r.trainer == "ours"]
    stock_median = statistics.median(s for r in stock for s in r.step_seconds)
    ours_median = statistics.median(s for r in ours for s in r.step_seconds)
    stock_tokens = statistics.mean(r.tokens_per_step for r in stock)
    ours_tokens = statistics.mean(r.tokens_per_step for r in ours)
    for r in ours:  # same seed, same data: our view of stock's batches must match stock's own
        if abs(r.stock_tokens_per_step - stock_tokens) > 0.5:
            print(
                f"warning: stock tokens differ ({r.stock_tokens_per_step} seen by ours vs {stock_tokens}); "
                "the two trainers did not see the same batches",
                file=sys.stderr,
            )
    speed = stock_median / ours_median
    stock_mean = statistics.mean(s for r in stock for s in r.step_seconds)
    ours_mean = statistics.mean(s for r in ours for s in r.step_seconds)
    limit = stock_tokens / ours_tokens
    per_round = [
        statistics.median(s.step_seconds) / statistics.median(o.step_seconds) for s, o in zip(stock, ours, strict=False)
    ]
    return Summary(
        gradient_checkpointing=gradient_checkpointing,
        stock_median_s=stock_median,
        ours_median_s=ours_median,
        stock_cpu_median_s=statistics.median(s for r in stock for s in r.cpu_seconds),
        ours_cpu_median_s=statistics.median(s for r in ours for s in r.cpu_seconds),
        speed_ratio=speed,
        mean_speed_ratio=stock_mean / ours_mean,
        paired_best_speed_ratio=sum(_best_per_step(stock)) / sum(_best_per_step(ours)),
        stock_tokens_per_step=stock_tokens,
        ours_tokens_per_step=ours_tokens,
        token_limit=limit,
        share_of_token_limit=speed / limit,
        stock_lm_head_positions_per_step=statistics.mean(r.lm_head_positions_per_step for r in stock),
        ours_lm_head_positions_per_step=statistics.mean(r.lm_head_positions_per_step for r in ours),
        per_round_speed_ratio=per_round,
    )


def print_table(summary: Summary) -> None:
    """A small text table of one setting."""
    gc_label = "on (TRL default)" if summary.gradient_checkpointing else "off"
    print(f"\ngradient checkpointing: {gc_label}")
    print(f"{'trainer':<26}{'median step (s)':>16}{'cpu s/step':>12}{'tokens/step':>14}{'LM-head pos/step':>18}")
    for label, wall, cpu, tokens, positions in (
        (
            "trl.DPOTrainer",
            summary.stock_median_s,
            summary.stock_cpu_median_s,
            summary.stock_tokens_per_step,
            summary.stock_lm_head_positions_per_step,
        ),
        (
            "PrefixSharedDPOTrainer",
            summary.ours_median_s,
            summary.ours_cpu_median_s,
            summary.ours_tokens_per_step,
            summary.ours_lm_head_positions_per_step,
        ),
    ):
        print(f"{label:<26}{wall:>16.3f}{cpu:>12.3f}{tokens:>14.0f}{positions:>18.0f}")
    rounds = ", ".join(f"{r:.2f}x" for r in summary.per_round_speed_ratio)
    cpu_ratio = summary.stock_cpu_median_s / summary.ours_cpu_median_s
    print(f"speed ratio (stock/ours), median step: {summary.speed_ratio:.2f}x   (per round: {rounds})")
    print(f"speed ratio, mean step (throughput): {summary.mean_speed_ratio:.2f}x   CPU time: {cpu_ratio:.2f}x")
    print(f"speed ratio, same batches, best of rounds (robust to load): {summary.paired_best_speed_ratio:.2f}x")
    print(f"token limit on the timed batches (stock/ours tokens): {summary.token_limit:.2f}x")
    print(f"share of the token limit reached: {summary.share_of_token_limit:.2f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET, help="JSONL preference data")
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of every run")
    parser.add_argument("--rounds", type=int, default=2, help="alternating (stock, ours) rounds")
    parser.add_argument("--batch-size", type=int, default=8, help="per_device_train_batch_size (pairs)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument(
        "--gradient-checkpointing",
        choices=("on", "off", "both"),
        default="on",
        help="'on' is TRL's DPOConfig default",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--dataset-stats",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure the token limit over every batch of the whole file (collation only)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write all measurements to this JSON file")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        parser.error("--warmup, --steps and --rounds must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    """Run the alternating benchmark and print (and optionally save) the results."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    rows = load_rows(args.dataset)
    dataset = sample_rows(rows, args.batch_size * (args.warmup + args.steps), args.seed)
    model_dir = build_model_dir(tokenizer, args.layers, args.hidden, args.heads, args.seed)
    settings = {"on": [True], "off": [False], "both": [True, False]}[args.gradient_checkpointing]
    print(
        f"data {args.dataset.name} ({len(dataset)} of {len(rows)} pairs, seeded sample), batch {args.batch_size}, "
        f"Llama {args.layers}x{args.hidden} "
        f"({args.heads} heads), fp32 on CPU, {torch.get_num_threads()} threads, max_length {args.max_length}, "
        f"{args.rounds} rounds x {args.steps} timed steps (+{args.warmup} warm-up); "
        f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}"
    )
    results: list[RunResult] = []
    for gradient_checkpointing in settings:
        for round_index in range(args.rounds):
            for name in ("stock", "ours"):
                result = run_once(name, args, model_dir, tokenizer, dataset, gradient_checkpointing)
                results.append(result)
                gc.collect()
                print(
                    f"  gc={'on' if gradient_checkpointing else 'off'} round {round_index + 1} {name:>5}: "
                    f"median {statistics.median(result.step_seconds):.3f} s/step, "
                    f"{result.tokens_per_step:.0f} tokens/step",
                    flush=True,
                )
    summaries = [summarize(results, gc_value) for gc_value in settings]
    for summary in summaries:
        print_table(summary)
    whole: dict[str, float] | None = None
    if args.dataset_stats:
        stock_tokens, our_tokens, batches = dataset_token_limit(args, model_dir, tokenizer, rows)
        whole = {"stock_tokens_per_step": stock_tokens, "ours_tokens_per_step": our_tokens, "batches": batches}
        whole["token_limit"] = stock_tokens / our_tokens
        print(
            f"\nwhole file ({batches} batches of {args.batch_size}): {stock_tokens:.0f} stock vs "
            f"{our_tokens:.0f} packed tokens/step, token limit {whole['token_limit']:.2f}x"
        )
    if args.json is not None:
        payload = {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "threads": torch.get_num_threads(),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
            "summaries": [asdict(s) for s in summaries],
            "whole_file_tokens": whole,
            "runs": [asdict(r) for r in results],
        }
        args.json.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
