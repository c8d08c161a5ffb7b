"""A CPU demo of ``PrefixSharedDPOTrainer`` that runs in well under a minute:
``python -m trl_prefix_share.commands.demo``.

Everything is built here, nothing is downloaded: a word-level tokenizer, a tiny Llama from a config, and a preference
task with long prompts (20-40 numbers) and one-number answers, so most of each pair is prompt and prefix sharing has
something to save. The demo trains with DPO, shows the reward accuracy rising, and prints the tokens saved.

``--vision``: the same with image prompts: a tiny Qwen2.5-VL-shaped model built from a config, the generated
charts-and-shapes preference set (``commands/image_preferences.py``), and the images the vision tower encoded.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import random
import tempfile
import warnings
from collections.abc import Iterator
from typing import Any

import datasets
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.trainer_callback import ProgressCallback

from trl_prefix_share.trainers.dpo.config import PrefixSharedDPOConfig
from trl_prefix_share.trainers.dpo.trainer import PrefixSharedDPOTrainer

MAX_NUMBER = 100  # answers and list items are the words "0" .. "99"
QUESTIONS = ("largest", "smallest")
SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")
TASK_WORDS = ("numbers:", "question:", "?", *QUESTIONS)

DEFAULT_STEPS = 60
DEFAULT_BATCH_SIZE = 16
QUICK_STEPS = 4
EVAL_EXAMPLES = 64
QUICK_EVAL_EXAMPLES = 16
TABLE_KEYS = ("loss", "rewards/accuracies", "rewards/margins", "prefix_share/token_ratio")


# -- task, tokenizer, model ------------------------------------------------------------------------------------------


def make_preference_task(num_examples: int, seed: int, min_numbers: int = 20, max_numbers: int = 40) -> Dataset:
    """Prompts list distinct numbers and ask for the largest or smallest; chosen is right, rejected another listed
    number. Long prompts and one-word answers make the shared prompt most of every pair."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num_examples):
        numbers = rng.sample(range(MAX_NUMBER), rng.randint(min_numbers, max_numbers))
        question = rng.choice(QUESTIONS)
        answer = max(numbers) if question == "largest" else min(numbers)
        wrong = rng.choice([n for n in numbers if n != answer])
        prompt = f"numbers: {' '.join(map(str, numbers))} question: {question} ?"
        rows.append({"prompt": prompt, "chosen": f" {answer}", "rejected": f" {wrong}"})
    return Dataset.from_list(rows)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the task's closed vocabulary: one token per number, so no download is needed."""
    words = [*SPECIAL_TOKENS, *TASK_WORDS, *map(str, range(MAX_NUMBER))]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # Registered as special tokens, "<eos>" is split off even when TRL appends it without a space ("31<eos>").
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def build_model(tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    """A tiny Llama (~0.1M parameters) from a config: big enough to learn the task, small enough for a CPU minute."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


# -- training --------------------------------------------------------------------------------------------------------


def make_config(args: argparse.Namespace, on_cpu: bool) -> PrefixSharedDPOConfig:
    """TRL's defaults, except what a tiny model on a CPU needs: no bf16, a high learning rate, frequent logs."""
    return PrefixSharedDPOConfig(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size * 2,
        learning_rate=args.learning_rate,
        beta=args.beta,
        warmup_steps=max(1, args.steps // 10),
        logging_steps=max(1, args.steps // 10),
        logging_first_step=True,
        seed=args.seed,
        use_cpu=on_cpu,
        bf16=not on_cpu,
        save_strategy="no",
        report_to="none",
    )


class TableProgressCallback(ProgressCallback):
    """The Trainer's tqdm bar, but each training log becomes one row of a small table instead of a raw dict."""

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if self.training_bar is not None:
            self.training_bar.write(format_row(("step", "loss", "accuracy", "margin", "token ratio")))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs:
            values = [logs.get(key, math.nan) for key in TABLE_KEYS]
            self.training_bar.write(format_row((state.global_step, *values)))


def format_row(cells: tuple[Any, ...]) -> str:
    return "".join(f"{cell:>14.3f}" if isinstance(cell, float) else f"{cell!s:>14}" for cell in cells)


def split_task(args: argparse.Namespace) -> tuple[Dataset, Dataset]:
    """Enough pairs that no training pair repeats, plus a held-out split for the before/after evaluation."""
    held_out = QUICK_EVAL_EXAMPLES if args.quick else EVAL_EXAMPLES
    data = make_preference_task(args.steps * args.batch_size + held_out, args.seed)
    split = data.train_test_split(test_size=held_out, seed=args.seed)
    return split["train"], split["test"]


def build_trainer(args: argparse.Namespace, train: Dataset, held_out: Dataset) -> PrefixSharedDPOTrainer:
    """Policy, an explicit frozen copy as reference (the model has no hub path to reload it from), and the task."""
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, args.seed)
    trainer = PrefixSharedDPOTrainer(
        model=model,
        ref_model=copy.deepcopy(model),
        args=make_config(args, on_cpu=not torch.cuda.is_available()),
        train_dataset=train,
        eval_dataset=held_out,
        processing_class=tokenizer,
    )
    if trainer.pop_callback(ProgressCallback) is not None:  # absent when tqdm is disabled: keep it that way
        trainer.add_callback(TableProgressCallback())
    return trainer


def evaluate(trainer: PrefixSharedDPOTrainer, held_out: Dataset) -> dict[str, float]:
    """TRL's evaluation on the held-out split, plus whether the policy itself now ranks the right answer first."""
    return {**trainer.evaluate(), "answer_accuracy": answer_accuracy(trainer, held_out), "pairs": len(held_out)}


@torch.no_grad()
def answer_accuracy(trainer: PrefixSharedDPOTrainer, dataset: Dataset) -> float:
    """Share of pairs whose chosen answer the policy itself scores above the rejected one.

    DPO's reward accuracy compares against the reference, so it starts at 0 (policy == reference: every reward is 0
    and ties count as misses); this is the plain "does the model now prefer the right answer" number.
    """
    model, tokenizer = trainer.model, trainer.processing_class
    prompts = tokenizer(list(dataset["prompt"]), padding=True, return_tensors="pt").to(trainer.accelerator.device)
    was_training = model.training
    model.eval()
    logits = model(**prompts, use_cache=False).logits
    model.train(was_training)
    last = prompts["attention_mask"].sum(dim=1) - 1  # right padding: the last prompt token predicts the answer
    next_token = logits[torch.arange(len(last)), last]
    chosen = torch.tensor([tokenizer(text)["input_ids"][0] for text in dataset["chosen"]], device=logits.device)
    rejected = torch.tensor([tokenizer(text)["input_ids"][0] for text in dataset["rejected"]], device=logits.device)
    wins = next_token.gather(1, chosen[:, None]) > next_token.gather(1, rejected[:, None])
    return wins.float().mean().item()


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run with ``count`` intra-op threads, then restore. The model's matrices are tiny, so extra threads mostly add
    synchronisation, and on a busy machine a descheduled thread stalls every op (measured: 10-20x slower)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def quiet_library_output() -> Iterator[None]:
    """Hide the dataset-map bars and the deprecation warnings of TRL's defaults, so the demo's own output shows."""
    bars_were_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        if bars_were_enabled:
            datasets.enable_progress_bars()


# -- report ----------------------------------------------------------------------------------------------------------


def token_savings(totals: dict[str, int]) -> dict[str, float]:
    """Packed tokens vs the tokens stock TRL's padded batches would have run, over the whole training run."""
    tokens, stock = totals["tokens"], totals["stock_tokens"]
    return {
        "tokens": tokens,
        "stock_tokens": stock,
        "token_ratio": stock / tokens if tokens else math.nan,
        "percent_saved": 100.0 * (1 - tokens / stock) if stock else math.nan,
    }


def print_evaluation(before: dict[str, float], after: dict[str, float]) -> None:
    keys = ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "answer_accuracy")
    print(f"\nHeld-out evaluation ({before['pairs']} pairs):")
    print(format_row(("", "DPO loss", "reward acc.", "margin", "picks chosen")))
    for name, metrics in (("before", before), ("after", after)):
        print(format_row((name, *(float(metrics.get(key, math.nan)) for key in keys))))
    print(
        "  reward acc.: chosen reward > rejected reward; before training the policy is the reference, every reward\n"
        "  is 0 and ties count as misses. picks chosen: the policy's own next-token log-prob ranks the right answer\n"
        "  above the wrong one (before training: whatever the random initialisation happens to prefer)."
    )


def print_savings(savings: dict[str, float]) -> None:
    print("\nTokens run by the model during training:")
    print(f"  stock TRL (padded, prompt twice): {savings['stock_tokens']:>10,}")
    print(f"  prefix-shared packing:            {savings['tokens']:>10,}")
    print(f"  ratio {savings['token_ratio']:.2f}x, {savings['percent_saved']:.1f}% fewer tokens")


# -- entry point -----------------------------------------------------------------------------------------------------


def positive_int(text: str) -> int:
    """argparse type: the Trainer reads ``max_steps=0`` as "train by epochs", so refuse it up front."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m trl_prefix_share.commands.demo",
        description="Train a tiny Llama with PrefixSharedDPOTrainer on CPU and print the tokens prefix sharing saved.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help=f"training steps; None: {DEFAULT_STEPS}, or {QUICK_STEPS} with --quick",
    )
    parser.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE, help="preference pairs per step")
    parser.add_argument("--seed", type=int, default=0, help="seed of the task, the model and the trainer")
    parser.add_argument("--learning-rate", type=float, default=3e-3, help="high, as the model is tiny and untrained")
    parser.add_argument("--beta", type=float, default=0.1, help="DPO beta")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (tiny model)")
    parser.add_argument("--output-dir", default=None, help="trainer output directory; None: a temporary one")
    parser.add_argument("--quick", action="store_true", help=f"few steps, {QUICK_EVAL_EXAMPLES} held-out pairs (tests)")
    parser.add_argument("--vision", action="store_true", help="image preferences with a tiny Qwen2.5-VL")
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = QUICK_STEPS if args.quick else DEFAULT_STEPS
    return args


#: The vision demo's model: Qwen2.5-VL's layout at a size that trains a step in about a second on a CPU.
VISION_DEMO_SHAPE = dict(
    layers=2, hidden=128, heads=4, kv_heads=2, intermediate=256, vision_depth=2, vision_hidden=64, vision_heads=2
)
VISION_IMAGE_SIZE = 112  # 64 patches of 14 pixels, 16 image tokens per image


def run_vision_demo(args: argparse.Namespace) -> dict[str, Any]:
    """DPO on image preferences: train, then print the tokens saved and the images encoded per forward."""
    from trl_prefix_share.commands.bench.data import DEFAULT_TOKENIZER
    from trl_prefix_share.commands.bench.vision import (
        ImageCounter,
        VisionShape,
        build_vision_model,
        qwen_vl_processor,
    )
    from trl_prefix_share.commands.image_preferences import image_preference_dataset

    shape = VisionShape(**VISION_DEMO_SHAPE, image_size=VISION_IMAGE_SIZE)
    processor = qwen_vl_processor(str(DEFAULT_TOKENIZER))
    model = build_vision_model(shape, processor, args.seed, torch.float32)
    train = image_preference_dataset(args.steps * args.batch_size, seed=args.seed, image_size=shape.image_size)
    trainer = PrefixSharedDPOTrainer(
        model=model,
        ref_model=copy.deepcopy(model),
        args=make_config(args, on_cpu=not torch.cuda.is_available()),
        train_dataset=train,
        processing_class=processor,
    )
    images = ImageCounter()
    images.watch(trainer.model)
    print(
        f"Training a tiny Qwen2.5-VL with DPO on {len(train)} image preferences (charts and shapes): {args.steps} "
        f"steps of {args.batch_size} pairs.\n"
    )
    result = trainer.train()
    savings = token_savings(trainer.prefix_share_totals)
    print_savings(savings)
    pairs = args.steps * args.batch_size
    print(
        f"  images encoded by the policy's vision tower: {images.images:,} (stock TRL: {2 * pairs:,}, each image for "
        "the chosen and again for the rejected row)"
    )
    return {"steps": trainer.state.global_step, "train_loss": result.training_loss, "images": images.images, **savings}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train, evaluate before and after, print the token savings; return the final metrics."""
    args = parse_args(argv)
    if args.vision:
        with quiet_library_output(), torch_threads(args.threads), tempfile.TemporaryDirectory() as tmp:
            args.output_dir = args.output_dir or tmp
            return run_vision_demo(args)
    train, held_out = split_task(args)
    with (
        quiet_library_output(),
        torch_threads(args.threads),
        tempfile.TemporaryDirectory(prefix="trl-prefix-share-demo-") as tmp,
    ):
        args.output_dir = args.output_dir or tmp
        trainer = build_trainer(args, train, held_out)
        if trainer.args.use_cpu:
            print(
                f"Running on CPU with {args.threads} torch thread(s): use_cpu=True, bf16=False "
                "(TRL's DPOConfig defaults to bf16=True)."
            )
        print(f"Training a tiny Llama with DPO: {args.steps} steps of {args.batch_size} pairs.\n")
        before = evaluate(trainer, held_out)
        result = trainer.train()
        after = evaluate(trainer, held_out)
    print_evaluation(before, after)
    savings = token_savings(trainer.prefix_share_totals)
    print_savings(savings)
    return {
        "steps": trainer.state.global_step,
        "train_loss": result.training_loss,
        "eval_before": before,
        "eval_after": after,
        **savings,
    }


if __name__ == "__main__":
    main()
