"""A few DPO training steps on real data; every process writes its logged history to `OUT/rank{i}.json`.

Run by `test_multiprocess.py` under `accelerate launch` (2 CPU processes, gloo) and, for the single-process side of
the comparison, imported and called in the test's own process. Not collected by pytest (no `test_` prefix).

    accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml tests/multiprocess_dpo_script.py \
        --model DIR --data FILE --out DIR [--trainer prefix_share|stock] [--per-device-batch 1] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="saved tiny model (with its tokenizer)")
    parser.add_argument("--data", required=True, help="jsonl with prompt/chosen/rejected or chosen/rejected")
    parser.add_argument("--out", required=True, help="directory for rank{i}.json")
    parser.add_argument("--trainer", choices=["prefix_share", "stock"], default="prefix_share")
    parser.add_argument("--per-device-batch", type=int, default=1)
    parser.add_argument("--examples", type=int, default=9)
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--max-batch-tokens", type=int, default=None, help="token-budget batches (ours only)")
    parser.add_argument("--gradient-accumulation", type=int, default=1)
    parser.add_argument("--union-of-ranks", type=int, default=None, help="stock: one batch = what N ranks get")
    return parser.parse_args(argv)


def read_rows(path: str, limit: int) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for _, line in zip(range(limit), handle, strict=False)]


def dpo_config(args: argparse.Namespace):
    """TRL's defaults (gradient checkpointing on, clipping at norm 1), fp32 on CPU, one epoch, a loss every step.

    Plain SGD rather than AdamW: AdamW's first updates are about lr * sign(grad), so float32 rounding noise in
    near-zero gradient entries (which differs with the reduction order) moves later losses by ~1e-5 relative, even
    between two single-process runs. SGD keeps the comparison at rounding level."""
    from trl import DPOConfig

    from trl_prefix_share import PrefixSharedDPOConfig

    budget = {} if args.max_batch_tokens is None else {"max_batch_tokens": args.max_batch_tokens}
    return (PrefixSharedDPOConfig if budget else DPOConfig)(
        **budget,
        gradient_accumulation_steps=args.gradient_accumulation,
        output_dir=tempfile.mkdtemp(prefix="mp-dpo-"),
        # On CPU, needed: without it the processes torchrun starts on a CUDA-less machine do not form a group.
        use_cpu=args.device == "cpu",
        bf16=False,
        per_device_train_batch_size=args.per_device_batch,
        num_train_epochs=1,
        max_length=args.max_length,
        optim="sgd",
        learning_rate=0.3,
        beta=0.5,
        seed=0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )


def build_trainer(args: argparse.Namespace):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOTrainer

    from trl_prefix_share import PrefixSharedDPOTrainer

    cls = PrefixSharedDPOTrainer if args.trainer == "prefix_share" else DPOTrainer
    if args.union_of_ranks:
        cls = union_of_ranks_trainer(args.max_batch_tokens, args.union_of_ranks)
    return cls(
        model=args.model,
        args=dpo_config(args),
        train_dataset=Dataset.from_list(read_rows(args.data, args.examples)),
        processing_class=AutoTokenizer.from_pretrained(args.model),
    )


def union_of_ranks_trainer(max_batch_tokens: int, ranks: int):
    """Stock DPO whose every step trains one batch: the union of what each of `ranks` processes gets from ours."""
    from transformers.trainer_pt_utils import BatchRebalanceSampler
    from trl import DPOTrainer

    from trl_prefix_share.trainers.dpo.length_grouping import preference_lengths
    from trl_prefix_share.trainers.dpo.token_budget import TokenBudgetBatchSampler, packed_tokens

    class UnionOfRanks(BatchRebalanceSampler):  # the Trainer passes this class as the loader's batch_sampler
        def __init__(self, samplers: list) -> None:
            self.samplers = samplers

        def __len__(self) -> int:
            return len(self.samplers[0])

        def set_epoch(self, epoch: int) -> None:
            for sampler in self.samplers:
                sampler.set_epoch(epoch)

        def __iter__(self):
            for parts in zip(*self.samplers, strict=True):
                yield [index for part in parts for index in part]

    class UnionDPOTrainer(DPOTrainer):
        def _get_train_sampler(self, train_dataset=None):
            data = train_dataset or self.train_dataset
            tokens, lengths = packed_tokens(data), preference_lengths(data)
            bucket = 64 * self.args.per_device_train_batch_size  # ours: length_bucket_batches * batch size
            samplers = [
                TokenBudgetBatchSampler(tokens, lengths, max_batch_tokens, bucket, self.args.seed, ranks, rank)
                for rank in range(ranks)
            ]
            return UnionOfRanks(samplers)

    return UnionDPOTrainer


def record_local_token_counts(trainer) -> list[list[int]]:
    """This process's own [packed, stock] token counts per step, to check that the logged ones are summed."""
    from trl_prefix_share.core.packing import PACKED_KEY

    seen: list[list[int]] = []
    log_counts = trainer._log_token_counts

    def recording(inputs: dict) -> None:
        seen.append([inputs[PACKED_KEY]["input_ids"].numel(), inputs["input_ids"].numel()])
        log_counts(inputs)

    trainer._log_token_counts = recording
    return seen


def run(argv: Sequence[str] | None = None) -> dict:
    """Train; write and return what this process saw (its rank, the world size, logs and token counts)."""
    from trl_prefix_share.commands.launch import release_process_group

    args = parse_args(argv)
    trainer = build_trainer(args)
    local_counts = record_local_token_counts(trainer) if args.trainer == "prefix_share" else []
    trainer.train()
    result = {
        "rank": trainer.accelerator.process_index,
        "num_processes": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "train_examples": len(trainer.train_dataset),
        "log_history": trainer.state.log_history,
        "local_token_counts": local_counts,
        "prefix_share_totals": getattr(trainer, "prefix_share_totals", None),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{result['rank']}.json").write_text(json.dumps(result, indent=1))
    release_process_group()  # or a worker may abort at exit after training (gloo's threads), failing the launch
    return result


if __name__ == "__main__":
    run(sys.argv[1:])
