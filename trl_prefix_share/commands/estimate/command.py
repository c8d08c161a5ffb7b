"""The `trl-prefix-share estimate` command line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from trl_prefix_share.commands.estimate.counting import count_tokens
from trl_prefix_share.commands.estimate.loading import load_preference_dataset, load_tokenizer
from trl_prefix_share.commands.estimate.report import format_report
from trl_prefix_share.commands.estimate.tokenization import tokenize_pairs
from trl_prefix_share.commands.estimate.vision import count_vision_tokens, format_vision_report, has_images
from trl_prefix_share.core.layout.tree import MIN_SHARED_TOKENS


def _optional_int(value: str) -> int | None:
    return None if value.lower() in {"none", "null", "0"} else int(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trl-prefix-share estimate",
        description="Tokens stock TRL's DPOTrainer (or GRPO/RLOO: --trainer grpo) would process on a dataset vs "
        "prefix sharing, and the speedup to expect. No model is loaded.",
    )
    parser.add_argument(
        "--trainer", choices=["dpo", "grpo", "rloo"], default="dpo", help="dpo: preference pairs; grpo/rloo: prompts"
    )
    parser.add_argument("--num-generations", type=int, default=8, help="grpo/rloo: completions per prompt (G)")
    parser.add_argument("--max-completion-length", type=int, default=256, help="grpo/rloo: TRL's field")
    parser.add_argument(
        "--completion-column",
        default=None,
        help="grpo/rloo: measure completion lengths from this column (capped); default: all max-completion-length",
    )
    parser.add_argument("--steps-per-generation", type=int, default=1, help="grpo/rloo: TRL's steps_per_generation")
    parser.add_argument(
        "--dataset",
        required=True,
        help="a .jsonl/.json/.parquet/.csv file, a hub dataset name, or `shapes` (the generated image preferences)",
    )
    parser.add_argument("--dataset-config", default=None, help="hub dataset configuration name")
    parser.add_argument("--split", default="train", help="dataset split (default: train)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer name or directory (the model's)")
    parser.add_argument(
        "--processor",
        default=None,
        help="image data: the model's processor (name or directory), so that image tokens are counted",
    )
    parser.add_argument(
        "--batch-size", type=int, nargs="+", default=[8], help="per-device train batch size(s) (default: 8)"
    )
    parser.add_argument("--max-length", type=_optional_int, default=1024, help="TRL's max_length; none: no limit")
    parser.add_argument("--truncation-mode", choices=["keep_start", "keep_end"], default="keep_start")
    parser.add_argument("--pad-to-multiple-of", type=_optional_int, default=None, help="TRL's pad_to_multiple_of")
    parser.add_argument("--max-row-tokens", type=_optional_int, default=None, help="token budget of a packed row")
    parser.add_argument(
        "--pad-rows-to-multiple-of",
        type=_optional_int,
        default=None,
        help="pad packed rows to a multiple of this (the trainer uses 128 on CUDA by default; none on CPU)",
    )
    parser.add_argument(
        "--group-by-prompt",
        action="store_true",
        help="dpo: ours with group_by_prompt=True (pairs of one prompt batched together, the prompt laid out once)",
    )
    parser.add_argument(
        "--prefix-tree-min-shared-tokens",
        type=int,
        default=MIN_SHARED_TOKENS,
        help="the config field: fewest tokens different prompts share in a prefix tree (default: %(default)s)",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="the model (hub name or directory; its config alone is read): also predict the peak memory of a step",
    )
    parser.add_argument("--seed", type=int, default=42, help="the Trainer's seed (or data_seed) for the shuffle")
    parser.add_argument("--no-shuffle", action="store_true", help="batches in dataset order")
    parser.add_argument("--limit", type=int, default=None, help="only the first N examples")
    parser.add_argument(
        "--sample", type=int, default=None, help="N examples drawn at random (seeded): ratios hold, totals shrink"
    )
    parser.add_argument(
        "--exact-tokenization", action="store_true", help="tokenize the prompt three times as TRL does (slower)"
    )
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the numbers as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _limit(dataset, args: argparse.Namespace):
    if args.limit is not None:
        dataset = dataset.select(range(min(args.limit, len(dataset))))
    if args.sample is not None and args.sample < len(dataset):
        picked = np.random.default_rng(args.seed).choice(len(dataset), args.sample, replace=False)
        dataset = dataset.select(np.sort(picked))
    return dataset


def _model_sizes(args: argparse.Namespace):
    """The model's sizes for the memory prediction (None without --model)."""
    if args.model is None:
        return None
    from trl_prefix_share.commands.estimate.memory import ModelSizes

    return ModelSizes.from_pretrained(args.model)


def run_online_estimate(dataset, args: argparse.Namespace, title: str) -> None:
    """`--trainer grpo|rloo`: prompt lengths from the data, completion lengths given or measured."""
    from datasets import Dataset

    from trl_prefix_share.commands.estimate.online import (
        completion_lengths,
        count_online_tokens,
        format_online_report,
        prompt_token_ids,
    )
    from trl_prefix_share.commands.prompt_sets import prompt_only_rows

    if "prompt" not in dataset.column_names:  # a preference file whose prompt is implicit in chosen / rejected
        rows, _ = prompt_only_rows(dataset.to_list())
        if not rows:
            raise SystemExit(
                f"--trainer {args.trainer} needs prompts: a `prompt` column, or `chosen` and `rejected` that start "
                f"with the same prompt; {args.dataset} has {dataset.column_names}"
            )
        if args.completion_column:
            raise SystemExit("--completion-column needs a dataset with its own `prompt` column")
        dataset = Dataset.from_list(rows)
    tokenizer = load_tokenizer(args.tokenizer)
    prompt_ids = prompt_token_ids(dataset, tokenizer)
    prompts = np.array([len(ids) for ids in prompt_ids], dtype=np.int64)
    completions = completion_lengths(dataset, tokenizer, args.completion_column, args.max_completion_length)
    source = f"column {args.completion_column!r}" if args.completion_column else "all max_completion_length"
    model = _model_sizes(args)
    estimates = [
        count_online_tokens(
            prompts,
            completions,
            args.num_generations,
            batch_size,
            args.steps_per_generation,
            shuffle=not args.no_shuffle,
            seed=args.seed,
            completion_source=source,
            prompt_ids=prompt_ids,
            min_shared_tokens=args.prefix_tree_min_shared_tokens,
            model=model,
        )
        for batch_size in args.batch_size
    ]
    print(format_online_report(estimates, title))
    if args.json:
        payload = {"dataset": args.dataset, "tokenizer": args.tokenizer, "trainer": args.trainer}
        payload["estimates"] = [e.to_dict() for e in estimates]
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def run_vision_estimate(dataset, args: argparse.Namespace) -> None:
    """Image preference data: collate with the processor (image tokens counted), batch size by batch size."""
    from transformers import AutoProcessor

    if args.processor is None:
        raise SystemExit(
            f"{args.dataset} holds images: pass the model's processor (--processor NAME_OR_DIR) so that image tokens "
            "are counted"
        )
    if not has_images(dataset):
        raise SystemExit(f"--processor is for image data; {args.dataset} has no `image`/`images` column")
    processor = AutoProcessor.from_pretrained(args.processor)
    estimates = [
        count_vision_tokens(
            dataset, processor, batch_size, args.max_length, shuffle=not args.no_shuffle, seed=args.seed
        )
        for batch_size in args.batch_size
    ]
    print(format_vision_report(estimates, f"trl-prefix-share estimate: {args.dataset} with processor {args.processor}"))
    if args.json:
        payload = {"dataset": args.dataset, "processor": args.processor, "estimates": [e.to_dict() for e in estimates]}
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def run_estimate(argv: list[str]) -> None:
    """The `estimate` command: tokenize once, count for each batch size, print the table (and write JSON)."""
    args = build_parser().parse_args(argv)
    if args.no_progress:
        from datasets import disable_progress_bars

        disable_progress_bars()
    if args.dataset == "shapes":
        from trl_prefix_share.commands.image_preferences import image_preference_dataset

        dataset = image_preference_dataset(256, seed=args.seed)
    else:
        dataset = load_preference_dataset(args.dataset, args.split, args.dataset_config)
    if has_images(dataset) or args.processor:
        run_vision_estimate(_limit(dataset, args), args)
        return
    if args.tokenizer is None:
        raise SystemExit("estimate needs --tokenizer (text data) or --processor (image data)")
    title = f"trl-prefix-share estimate: {args.dataset} with tokenizer {args.tokenizer}"
    if args.trainer != "dpo":
        dataset = _limit(dataset, args)
        run_online_estimate(dataset, args, f"{title} ({args.trainer.upper()}: one log-prob pass)")
        return
    if args.limit is not None:
        dataset = dataset.select(range(min(args.limit, len(dataset))))
    if args.sample is not None and args.sample < len(dataset):
        title += f" (random sample of {args.sample:,} of {len(dataset):,} examples)"
        picked = np.random.default_rng(args.seed).choice(len(dataset), args.sample, replace=False)
        dataset = dataset.select(np.sort(picked))
    tokenizer = load_tokenizer(args.tokenizer)
    pairs = tokenize_pairs(
        dataset, tokenizer, args.max_length, args.truncation_mode, not args.no_progress, args.exact_tokenization
    )
    model = _model_sizes(args)
    estimates = [
        count_tokens(
            pairs,
            batch_size,
            shuffle=not args.no_shuffle,
            seed=args.seed,
            pad_to_multiple_of=args.pad_to_multiple_of,
            max_row_tokens=args.max_row_tokens,
            pad_rows_to_multiple_of=args.pad_rows_to_multiple_of,
            group_by_prompt=args.group_by_prompt,
            prefix_tree_min_shared_tokens=args.prefix_tree_min_shared_tokens,
            model=model,
        )
        for batch_size in args.batch_size
    ]
    print(format_report(estimates, title))
    if args.json:
        payload = {"dataset": args.dataset, "tokenizer": args.tokenizer, "estimates": [e.to_dict() for e in estimates]}
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
