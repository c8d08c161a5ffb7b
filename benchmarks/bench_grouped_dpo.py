"""End-to-end benchmark on data with repeated prompts: stock ``trl.DPOTrainer`` vs ``PrefixSharedDPOTrainer`` (one
document per pair) vs ``GroupedPrefixSharedDPOTrainer`` (one document per prompt).

Data: PandaLM (842 pairwise comparisons over 153 prompts, up to 10 pairs and 5 distinct responses per prompt), or any
JSONL preference file with repeated prompts. All three trainers see the same batches in the same order: the
prompt-grouped order of ``PromptGroupedSampler`` (stock and the per-pair trainer are given it too), so the comparison
isolates the layout. Each runs ``trainer.train()`` from the same randomly initialised Llama (TRL's defaults, gradient
checkpointing on, except CPU/fp32/no reporting), alternately, for ``--rounds`` rounds; the first ``--warmup`` steps
are not timed. Tokens per step: stock's padded ``[chosen; rejected]`` batch vs the packed rows.

Example::

    OMP_NUM_THREADS=1 python benchmarks/bench_grouped_dpo.py --json /tmp/grouped_dpo.json
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
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, TrainerCallback  # noqa: E402
from transformers.trainer_callback import PrinterCallback, ProgressCallback  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from trl_prefix_share import PrefixSharedDPOTrainer  # noqa: E402
from trl_prefix_share.collator import PACKED_KEY  # noqa: E402
from trl_prefix_share.grouped_dpo_trainer import GroupedPrefixSharedDPOTrainer  # noqa: E402
from trl_prefix_share.grouping import prompt_grouped_sampler  # noqa: E402

SHARED = Path(os.environ.get("TRL_PREFIX_SHARE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
DEFAULT_DATASET = SHARED / "data" / "pandalm_human_testset.jsonl"
DEFAULT_TOKENIZER = SHARED / "tokenizers" / "smollm"


class _GroupedOrder:
    """Mixin: train in the prompt-grouped order (what the grouped trainer uses), so all trainers see the same
    batches."""

    def _get_train_sampler(self, train_dataset=None):
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return prompt_grouped_sampler(train_dataset or self.train_dataset, self._train_batch_size, seed)


class StockSameOrder(_GroupedOrder, DPOTrainer):
    pass


class PairsSameOrder(_GroupedOrder, PrefixSharedDPOTrainer):
    pass


TRAINERS = {"stock": StockSameOrder, "pairs": PairsSameOrder, "grouped": GroupedPrefixSharedDPOTrainer}


@dataclass
class RunResult:
    trainer: str
    step_seconds: list[float]
    tokens_per_step: float
    stock_tokens_per_step: float


class StepTimer(TrainerCallback):
    def __init__(self) -> None:
        self.step_ends: list[float] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.step_ends.append(time.perf_counter())


class TokenCounter:
    """Wraps a collator; records tokens run per batch (packed rows if any, else the padded batch) in order."""

    def __init__(self, collator) -> None:
        self.collator = collator
        self.ours: list[int] = []
        self.stock: list[int] = []

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(examples)
        self.stock.append(int(batch["input_ids"].numel()))
        self.ours.append(int(batch[PACKED_KEY]["input_ids"].numel()) if PACKED_KEY in batch else self.stock[-1])
        return batch


def build_model_dir(tokenizer, layers: int, hidden: int, heads: int, seed: int) -> str:
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
    path = tempfile.mkdtemp(prefix="bench-gdpo-model-")
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run_once(name: str, args: argparse.Namespace, model_dir: str, tokenizer, dataset: Dataset) -> RunResult:
    with tempfile.TemporaryDirectory(prefix="bench-gdpo-out-") as output_dir:
        config = DPOConfig(
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
        )
        trainer = TRAINERS[name](model=model_dir, args=config, train_dataset=dataset, processing_class=tokenizer)
        for callback in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(callback)
        counter = TokenCounter(trainer.data_collator)
        trainer.data_collator = counter
        timer = StepTimer()
        trainer.add_callback(timer)
        trainer.train()
    marks = timer.step_ends
    step_seconds = [b - a for a, b in zip(marks[args.warmup - 1 : -1], marks[args.warmup :], strict=True)]
    timed = slice(args.warmup, args.warmup + args.steps)  # the dataloader may collate ahead: trained ones come first
    return RunResult(name, step_seconds, statistics.mean(counter.ours[timed]), statistics.mean(counter.stock[timed]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step")
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
    with open(args.dataset, encoding="utf-8") as handle:
        dataset = Dataset.from_list([json.loads(line) for line in handle if line.strip()])
    model_dir = build_model_dir(tokenizer, args.layers, args.hidden, args.heads, args.seed)
    print(
        f"data {args.dataset.name} ({len(dataset)} pairs), batch {args.batch_size} pairs in prompt-grouped order, "
        f"Llama {args.layers}x{args.hidden}, fp32 CPU, {torch.get_num_threads()} threads; {args.rounds} rounds x "
        f"{args.steps} steps (+{args.warmup} warm-up); torch {torch.__version__}, transformers "
        f"{transformers.__version__}, trl {trl.__version__}"
    )
    results: list[RunResult] = []
    for round_index in range(args.rounds):
        for name in TRAINERS:
            result = run_once(name, args, model_dir, tokenizer, dataset)
            results.append(result)
            gc.collect()
            print(
                f"  round {round_index + 1} {name:>7}: median {statistics.median(result.step_seconds):.3f} s/step, "
                f"{result.tokens_per_step:.0f} tokens/step",
                flush=True,
            )
    summary: dict[str, dict[str, float]] = {}
    for name in TRAINERS:
        runs = [r for r in results if r.trainer == name]
        best = sum(min(t) for t in zip(*(r.step_seconds for r in runs), strict=True)) / args.steps
        summary[name] = {
            "median_s": statistics.median(s for r in runs for s in r.step_seconds),
            "best_s": best,
            "tokens_per_step": runs[0].tokens_per_step,
        }
    print(f"\n{'trainer':<10}{'median s/step':>15}{'best s/step':>13}{'tokens/step':>13}{'speed':>8}{'tokens':>8}")
    for name, row in summary.items():
        speed = summary["stock"]["median_s"] / row["median_s"]
        tokens = summary["stock"]["tokens_per_step"] / row["tokens_per_step"]
        row.update(speed_ratio=speed, token_ratio=tokens)
        print(
            f"{name:<10}{row['median_s']:>15.3f}{row['best_s']:>13.3f}{row['tokens_per_step']:>13.0f}"
            f"{speed:>7.2f}x{tokens:>7.2f}x"
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
