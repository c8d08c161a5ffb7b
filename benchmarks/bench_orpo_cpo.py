"""Side-by-side end-to-end benchmark: stock ``ORPOTrainer`` / ``CPOTrainer`` vs the prefix-shared trainers.

For each dataset and trainer kind (ORPO; CPO with ``loss_type="simpo"``, i.e. SimPO), both trainers run
``trainer.train()`` on the same data, tokenizer, initial model (a randomly initialised Llama saved to a temporary
directory), seed and config (TRL's defaults, gradient checkpointing on, except CPU/fp32/no reporting), alternately
(stock, ours, stock, ours, ...) so that machine drift cancels. The first ``--warmup`` steps of every run are not
timed; a step is timed from the end of the previous step to the end of this one (batch fetch and collation, our
layout building, forward, backward, optimizer, logging).

Tokens per step: *stock* is the stacked ``[chosen; rejected]`` batch the stock forward runs (``2B x L``), *ours* the
tokens of the packed rows. Stock ORPO/CPO also project every one of those positions (prompt and padding included)
through the LM head and keep the full ``[2B, L, V]`` logits; ours projects only the scored positions. Run with
``--ablation`` to add ``share_prefix=False`` (packed, fused head, but each sequence laid out alone), which separates
the gain of sharing the prompt from the gain of padding-free packing and the fused head.

Rows whose prompt alone fills ``max_length`` are left out up front (stock returns a NaN loss on them, ours refuses).

Example::

    OMP_NUM_THREADS=1 python benchmarks/bench_orpo_cpo.py --plot /tmp/orpo_cpo.png --json /tmp/orpo_cpo.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, TrainerCallback  # noqa: E402
from transformers.trainer_callback import PrinterCallback, ProgressCallback  # noqa: E402
from trl.data_utils import maybe_extract_prompt  # noqa: E402
from trl.experimental.cpo import CPOConfig, CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOConfig, ORPOTrainer  # noqa: E402

from trl_prefix_share.cpo_trainer import PrefixSharedCPOConfig, PrefixSharedCPOTrainer  # noqa: E402
from trl_prefix_share.orpo_trainer import PrefixSharedORPOConfig, PrefixSharedORPOTrainer  # noqa: E402

SHARED = Path(os.environ.get("TRL_PREFIX_SHARE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
DATASETS = {
    "hh_harmless": SHARED / "data" / "hh_harmless_base_test.jsonl",
    "ultrafeedback": SHARED / "data" / "ultrafeedback_binarized_1200.jsonl",
}
DEFAULT_TOKENIZER = SHARED / "tokenizers" / "smollm"
# Trainer and config classes per kind; `unshared` is ours with share_prefix=False (the ablation).
TRAINERS = {
    "orpo": {"stock": ORPOTrainer, "ours": PrefixSharedORPOTrainer, "unshared": PrefixSharedORPOTrainer},
    "cpo": {"stock": CPOTrainer, "ours": PrefixSharedCPOTrainer, "unshared": PrefixSharedCPOTrainer},
}
CONFIGS = {"orpo": PrefixSharedORPOConfig, "cpo": PrefixSharedCPOConfig}
STOCK_CONFIGS = {"orpo": ORPOConfig, "cpo": CPOConfig}
LABELS = {"orpo": "ORPO", "cpo": "SimPO (CPO)"}


@dataclass
class RunResult:
    """Measurements of one ``trainer.train()`` run."""

    dataset: str
    kind: str
    trainer: str
    step_seconds: list[float]
    tokens_per_step: float
    stock_tokens_per_step: float


class StepTimer(TrainerCallback):
    """Wall time at the end of every optimizer step, and the trainer's token totals at that moment."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.ends: list[float] = []
        self.tokens: list[tuple[int, int]] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.ends.append(time.perf_counter())
        totals = getattr(self.trainer, "prefix_share_totals", None)
        self.tokens.append((totals["tokens"], totals["stock_tokens"]) if totals else (0, 0))


class StackedTokenCounter:
    """Wraps the stock collator; records the size of the stacked batch the stock forward runs (``2B x L``)."""

    def __init__(self, collator: Any) -> None:
        self.collator = collator
        self.counts: list[int] = []

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(features)
        width = max(batch["chosen_input_ids"].size(1), batch["rejected_input_ids"].size(1))
        self.counts.append(2 * batch["chosen_input_ids"].size(0) * width)
        return batch


def load_rows(path: Path, tokenizer: Any, max_length: int) -> list[dict[str, Any]]:
    """All rows of a JSONL file whose prompt leaves room for a response under ``max_length`` (ORPO/CPO truncate the
    response, never the prompt)."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                row = maybe_extract_prompt(json.loads(line))
                if len(tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]) + 4 < max_length:
                    rows.append(row)
    return rows


def build_model_dir(tokenizer: Any, layers: int, hidden: int, heads: int, seed: int) -> str:
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
    path = tempfile.mkdtemp(prefix="bench-orpo-cpo-model-")
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run_once(
    dataset_name: str, kind: str, name: str, args: argparse.Namespace, model_dir: str, tokenizer: Any, data: Dataset
) -> RunResult:
    """Build one trainer, train it, and return its timed steps and tokens per step."""
    with tempfile.TemporaryDirectory(prefix="bench-orpo-cpo-out-") as output_dir:
        config_cls = STOCK_CONFIGS[kind] if name == "stock" else CONFIGS[kind]
        extra = {} if name == "stock" else {"share_prefix": name != "unshared"}
        config = config_cls(
            output_dir=output_dir,
            per_device_train_batch_size=args.batch_size,
            max_steps=args.warmup + args.steps,
            max_length=args.max_length,
            use_cpu=True,
            bf16=False,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            seed=args.seed,
            data_seed=args.seed,
            **({"loss_type": "simpo"} if kind == "cpo" else {}),
            **extra,
        )
        trainer = TRAINERS[kind][name](model=model_dir, args=config, train_dataset=data, processing_class=tokenizer)
        for callback in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(callback)
        counter = StackedTokenCounter(trainer.data_collator)
        trainer.data_collator = counter
        timer = StepTimer(trainer)
        trainer.add_callback(timer)
        trainer.train()
    if len(timer.ends) != args.warmup + args.steps:
        raise RuntimeError(f"{kind}/{name}: expected {args.warmup + args.steps} steps, got {len(timer.ends)}")
    steps = [b - a for a, b in zip(timer.ends[args.warmup - 1 : -1], timer.ends[args.warmup :], strict=True)]
    if name == "stock":
        # The data loader may collate one batch ahead: the trained batches are the first ones collated.
        tokens = stock_tokens = sum(counter.counts[args.warmup : args.warmup + args.steps]) / args.steps
    else:
        first, last = timer.tokens[args.warmup - 1], timer.tokens[-1]
        tokens, stock_tokens = ((last[i] - first[i]) / args.steps for i in (0, 1))
    timer.trainer = None
    return RunResult(dataset_name, kind, name, steps, tokens, stock_tokens)


def summarize(results: list[RunResult], names: list[str]) -> list[dict[str, Any]]:
    """One row per (dataset, kind): median step time and tokens per trainer, and the ratios to stock."""
    rows = []
    for dataset, kind in dict.fromkeys((r.dataset, r.kind) for r in results):
        row: dict[str, Any] = {"dataset": dataset, "kind": kind}
        for name in names:
            runs = [r for r in results if (r.dataset, r.kind, r.trainer) == (dataset, kind, name)]
            row[f"{name}_median_s"] = statistics.median(s for r in runs for s in r.step_seconds)
            row[f"{name}_tokens"] = statistics.mean(r.tokens_per_step for r in runs)
        for name in names[1:]:
            row[f"{name}_speed_ratio"] = row["stock_median_s"] / row[f"{name}_median_s"]
            row[f"{name}_token_ratio"] = row["stock_tokens"] / row[f"{name}_tokens"]
        ours = [r for r in results if (r.dataset, r.kind, r.trainer) == (dataset, kind, "ours")]
        if any(abs(r.stock_tokens_per_step - row["stock_tokens"]) > 0.5 for r in ours):
            warnings.warn(f"{dataset}/{kind}: the trainers did not see the same batches", stacklevel=1)
        rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]], names: list[str]) -> None:
    header = f"{'dataset':<14}{'trainer':<13}" + "".join(f"{n + ' s/step':>16}{n + ' tok':>14}" for n in names)
    header += "".join(f"{n + ' speed':>16}{n + ' tok ratio':>18}" for n in names[1:])
    print("\n" + header)
    for row in rows:
        line = f"{row['dataset']:<14}{LABELS[row['kind']]:<13}"
        line += "".join(f"{row[f'{n}_median_s']:>16.3f}{row[f'{n}_tokens']:>14.0f}" for n in names)
        line += "".join(f"{row[f'{n}_speed_ratio']:>15.2f}x{row[f'{n}_token_ratio']:>17.2f}x" for n in names[1:])
        print(line)


def plot(rows: list[dict[str, Any]], names: list[str], path: Path, subtitle: str) -> None:
    """Grouped bars of the median step time per (dataset, trainer kind), stock next to ours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['dataset']}\n{LABELS[r['kind']]}" for r in rows]
    width = 0.8 / len(names)
    figure, axis = plt.subplots(figsize=(2.2 * len(rows) + 2, 4.2))
    legend = {"stock": "stock TRL", "ours": "prefix-shared", "unshared": "packed, unshared"}
    for index, name in enumerate(names):
        xs = [i + (index - (len(names) - 1) / 2) * width for i in range(len(rows))]
        bars = axis.bar(xs, [r[f"{name}_median_s"] for r in rows], width, label=legend[name])
        if name != "stock":
            for bar, row in zip(bars, rows, strict=True):
                axis.annotate(
                    f"{row[f'{name}_speed_ratio']:.2f}x",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                )
    axis.set_xticks(range(len(rows)), labels)
    axis.set_ylabel("median train step (s)")
    axis.set_title(f"train() step time, stock vs prefix-shared\n{subtitle}", fontsize=9)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=["hh_harmless", "ultrafeedback"])
    parser.add_argument("--kinds", nargs="+", choices=sorted(TRAINERS), default=["orpo", "cpo"])
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of every run")
    parser.add_argument("--rounds", type=int, default=2, help="alternating (stock, ours) rounds")
    parser.add_argument("--batch-size", type=int, default=8, help="per_device_train_batch_size (pairs)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--ablation", action="store_true", help="also run share_prefix=False")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--json", type=Path, default=None, help="write all measurements to this JSON file")
    parser.add_argument("--plot", type=Path, default=None, help="write a bar chart (PNG) to this path")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        parser.error("--warmup, --steps and --rounds must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    transformers.logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    model_dir = build_model_dir(tokenizer, args.layers, args.hidden, args.heads, args.seed)
    names = ["stock", "ours"] + (["unshared"] if args.ablation else [])
    subtitle = (
        f"Llama {args.layers}x{args.hidden}, batch {args.batch_size}, fp32, CPU ({torch.get_num_threads()} threads), "
        f"max_length {args.max_length}, gradient checkpointing on"
    )
    print(
        f"{subtitle}; {args.rounds} rounds x {args.steps} timed steps (+{args.warmup} warm-up); torch "
        f"{torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}"
    )
    results: list[RunResult] = []
    for dataset_name in args.datasets:
        rows = load_rows(DATASETS[dataset_name], tokenizer, args.max_length)
        sample = random.Random(args.seed).sample(rows, min(len(rows), args.batch_size * (args.warmup + args.steps)))
        data = Dataset.from_list(sample)
        for kind in args.kinds:
            for round_index in range(args.rounds):
                for name in names:
                    result = run_once(dataset_name, kind, name, args, model_dir, tokenizer, data)
                    results.append(result)
                    gc.collect()
                    median = statistics.median(result.step_seconds)
                    print(
                        f"  {dataset_name} {kind} round {round_index + 1} {name:>8}: median {median:.3f} s/step, "
                        f"{result.tokens_per_step:.0f} tokens/step",
                        flush=True,
                    )
    table = summarize(results, names)
    print_table(table, names)
    if args.plot is not None:
        plot(table, names, args.plot, subtitle)
        print(f"\nfigure: {args.plot}")
    if args.json is not None:
        payload = {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "threads": torch.get_num_threads(),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
            "summary": table,
            "runs": [asdict(r) for r in results],
        }
        args.json.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
