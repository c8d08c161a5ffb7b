"""Side-by-side end-to-end benchmark: stock ``trl.RewardTrainer`` vs ``PrefixSharedRewardTrainer``.

Two modes:

- ``pairs``: TRL's pairwise data (default: HH harmless), both trainers on the same pairs.
- ``ranked``: data with repeated prompts (PandaLM: several pairwise comparisons per prompt), turned into ranked lists
  of ``--responses`` responses per prompt (``ranked_from_pairs``, best-first, ``K (K - 1) / 2`` pairs each). Ours trains
  on the ranked lists, ``--batch-size`` prompts per step; stock trains on the binarized pairs of the same prompts,
  ``--batch-size x K (K - 1) / 2`` pairs per step, in the same order (sequential sampling on both sides), so both
  optimise the same loss on the same pairs at every step.

Both trainers run ``trainer.train()`` from the same randomly initialised Llama sequence-classification model (saved to
a temporary directory), seed and config (TRL's defaults, gradient checkpointing on, except CPU/fp32/no reporting),
alternately (stock, ours, stock, ours, ...) so that machine drift cancels. The first ``--warmup`` steps of each run
are not timed; a step is timed from the end of the previous one to its own end (batch fetch and collation, our layout
building, forward, backward, optimizer, logging). Tokens per step: stock's padded batch vs our packed rows.

Example::

    OMP_NUM_THREADS=1 python benchmarks/bench_reward.py --mode ranked --json /tmp/reward_ranked.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification, TrainerCallback  # noqa: E402
from transformers.trainer_callback import PrinterCallback, ProgressCallback  # noqa: E402
from trl import RewardConfig, RewardTrainer  # noqa: E402

from trl_prefix_share.collator import PACKED_KEY  # noqa: E402
from trl_prefix_share.ranked import binarize_ranked, ranked_from_pairs  # noqa: E402
from trl_prefix_share.reward_trainer import PrefixSharedRewardTrainer  # noqa: E402

SHARED = Path(os.environ.get("TRL_PREFIX_SHARE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
DEFAULT_DATA = {
    "pairs": SHARED / "data" / "hh_harmless_base_test.jsonl",
    "ranked": SHARED / "data" / "pandalm_human_testset.jsonl",
}
DEFAULT_TOKENIZER = SHARED / "tokenizers" / "smollm"


@dataclass
class RunResult:
    trainer: str
    step_seconds: list[float]
    tokens_per_step: float
    stock_tokens_per_step: float


class StepTimer(TrainerCallback):
    """Wall time at the end of every optimizer step."""

    def __init__(self) -> None:
        self.step_ends: list[float] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.step_ends.append(time.perf_counter())


class TokenCounter:
    """Wraps a collator and records the tokens each batch runs (packed rows if any, else the padded batch)."""

    def __init__(self, collator) -> None:
        self.collator = collator
        self.ours: list[int] = []
        self.stock: list[int] = []

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(examples)
        stock = int(batch["input_ids"].numel())
        self.stock.append(stock)
        self.ours.append(int(batch[PACKED_KEY]["input_ids"].numel()) if PACKED_KEY in batch else stock)
        return batch


def load_rows(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def datasets_for(args: argparse.Namespace) -> tuple[Dataset, Dataset, int]:
    """(stock dataset, our dataset, stock batch size) for the mode; ours uses ``args.batch_size``."""
    rows = load_rows(args.dataset or DEFAULT_DATA[args.mode])
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


def build_model_dir(tokenizer, layers: int, hidden: int, heads: int, seed: int) -> str:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=2048,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    path = tempfile.mkdtemp(prefix="bench-rm-model-")
    LlamaForSequenceClassification(config).to(torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run_once(name: str, args: argparse.Namespace, model_dir: str, tokenizer, dataset: Dataset, batch: int) -> RunResult:
    cls = RewardTrainer if name == "stock" else PrefixSharedRewardTrainer
    with tempfile.TemporaryDirectory(prefix="bench-rm-out-") as output_dir:
        config = RewardConfig(
            output_dir=output_dir,
            per_device_train_batch_size=batch,
            max_steps=args.warmup + args.steps,
            max_length=args.max_length,
            use_cpu=True,
            bf16=False,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            seed=args.seed,
            train_sampling_strategy="sequential",
        )
        trainer = cls(model=model_dir, args=config, train_dataset=dataset, processing_class=tokenizer)
        for callback in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(callback)
        counter = TokenCounter(trainer.data_collator)
        trainer.data_collator = counter
        timer = StepTimer()
        trainer.add_callback(timer)
        trainer.train()
    marks = timer.step_ends
    step_seconds = [b - a for a, b in zip(marks[args.warmup - 1 : -1], marks[args.warmup :], strict=True)]
    timed = slice(args.warmup, args.warmup + args.steps)  # sequential sampling: batch i trains step i
    return RunResult(name, step_seconds, statistics.mean(counter.ours[timed]), statistics.mean(counter.stock[timed]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("pairs", "ranked"), default="ranked")
    parser.add_argument("--dataset", type=Path, default=None, help="JSONL data (default depends on --mode)")
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    parser.add_argument("--responses", type=int, default=4, help="ranked mode: responses per prompt")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs (pairs mode) or prompts (ranked mode)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        parser.error("--warmup, --steps and --rounds must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    transformers.logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    stock_data, our_data, stock_batch = datasets_for(args)
    model_dir = build_model_dir(tokenizer, args.layers, args.hidden, args.heads, args.seed)
    print(
        f"mode {args.mode}: stock {stock_batch} pairs/step, ours {args.batch_size} "
        f"{'prompts' if args.mode == 'ranked' else 'pairs'}/step; Llama-RM {args.layers}x{args.hidden}, fp32 CPU, "
        f"{torch.get_num_threads()} threads; {args.rounds} rounds x {args.steps} steps (+{args.warmup} warm-up); "
        f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}"
    )
    results: list[RunResult] = []
    for round_index in range(args.rounds):
        for name, data, batch in (("stock", stock_data, stock_batch), ("ours", our_data, args.batch_size)):
            result = run_once(name, args, model_dir, tokenizer, data, batch)
            results.append(result)
            gc.collect()
            print(
                f"  round {round_index + 1} {name:>5}: median {statistics.median(result.step_seconds):.3f} s/step, "
                f"{result.tokens_per_step:.0f} tokens/step",
                flush=True,
            )
    stock = [r for r in results if r.trainer == "stock"]
    ours = [r for r in results if r.trainer == "ours"]
    best = [
        sum(min(t) for t in zip(*(r.step_seconds for r in runs), strict=True)) / args.steps for runs in (stock, ours)
    ]
    summary = {
        "stock_median_s": statistics.median(s for r in stock for s in r.step_seconds),
        "ours_median_s": statistics.median(s for r in ours for s in r.step_seconds),
        "stock_best_s": best[0],
        "ours_best_s": best[1],
        "stock_tokens_per_step": stock[0].tokens_per_step,
        "ours_tokens_per_step": ours[0].tokens_per_step,
    }
    summary["speed_ratio"] = summary["stock_median_s"] / summary["ours_median_s"]
    summary["best_speed_ratio"] = best[0] / best[1]
    summary["token_ratio"] = summary["stock_tokens_per_step"] / summary["ours_tokens_per_step"]
    print(
        f"\ntokens/step: stock {summary['stock_tokens_per_step']:.0f}, ours {summary['ours_tokens_per_step']:.0f} "
        f"(ratio {summary['token_ratio']:.2f}x)\n"
        f"median step: stock {summary['stock_median_s']:.3f} s, ours {summary['ours_median_s']:.3f} s "
        f"(speed ratio {summary['speed_ratio']:.2f}x; same steps, best of rounds: {summary['best_speed_ratio']:.2f}x)"
    )
    if args.json is not None:
        payload = {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "summary": summary,
            "runs": [asdict(r) for r in results],
        }
        args.json.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
