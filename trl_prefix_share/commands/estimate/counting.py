"""Batching and counting: the tokens stock TRL's padded batches and our packed rows hold over one epoch."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from trl_prefix_share.commands.estimate.loading import load_preference_dataset, load_tokenizer
from trl_prefix_share.commands.estimate.results import LengthStats, PairLengths, SavingsEstimate
from trl_prefix_share.commands.estimate.tokenization import tokenize_pairs
from trl_prefix_share.core.layout import assign_rows


def _round_up(value: np.ndarray, multiple: int | None) -> np.ndarray:
    if not multiple or multiple <= 1:
        return value
    return -(-value // multiple) * multiple


def sampler_order(num_examples: int, shuffle: bool, seed: int) -> np.ndarray:
    """The Trainer's first-epoch order: accelerate's seedable sampler draws `torch.randperm` seeded with `seed`."""
    if not shuffle:
        return np.arange(num_examples)
    import torch

    return torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed)).numpy()


def _packed_tokens(documents: np.ndarray, max_row_tokens: int | None, pad_rows_to_multiple_of: int | None) -> int:
    """Tokens of one batch's packed rows (`pack_documents`): rows x the longest row, rounded up."""
    rows = assign_rows(documents.tolist(), max_row_tokens)
    longest = max(int(documents[row].sum()) for row in rows)
    return len(rows) * int(_round_up(np.int64(longest), pad_rows_to_multiple_of))


def count_tokens(
    pairs: PairLengths,
    batch_size: int = 8,
    shuffle: bool = True,
    seed: int = 42,
    pad_to_multiple_of: int | None = None,
    max_row_tokens: int | None = None,
    pad_rows_to_multiple_of: int | None = None,
) -> SavingsEstimate:
    """Sum stock and prefix-shared tokens over the batches of one epoch (the last batch may be short, as in TRL)."""
    order = sampler_order(len(pairs), shuffle, seed)
    starts = np.arange(0, len(order), batch_size)
    stock = unpadded = ours = 0
    ratios = []
    if len(order):
        longest = np.maximum(pairs.chosen_seq, pairs.rejected_seq)[order]
        sizes = np.diff(np.append(starts, len(order)))
        stock_batches = 2 * sizes * _round_up(np.maximum.reduceat(longest, starts), pad_to_multiple_of)
        documents = pairs.document[order]
        ours_batches = np.array(
            [_packed_tokens(documents[s : s + batch_size], max_row_tokens, pad_rows_to_multiple_of) for s in starts]
        )
        stock, ours = int(stock_batches.sum()), int(ours_batches.sum())
        unpadded = int(pairs.chosen_seq.sum() + pairs.rejected_seq.sum())
        ratios = stock_batches / ours_batches
    return SavingsEstimate(
        examples=len(pairs),
        batch_size=batch_size,
        batches=len(starts),
        stock_tokens=stock,
        unpadded_tokens=unpadded,
        tokens=ours,
        mean_batch_ratio=float(np.mean(ratios)) if len(ratios) else 0.0,
        prompt=LengthStats.of(pairs.prompt),
        chosen=LengthStats.of(pairs.chosen),
        rejected=LengthStats.of(pairs.rejected),
        prompt_share=float(pairs.prompt_seq.sum()) / max(unpadded, 1),
        conversational=pairs.conversational,
        implicit_prompt=pairs.implicit_prompt,
        dropped=pairs.dropped,
        truncated=int(
            (
                (pairs.chosen_seq < pairs.prompt + pairs.chosen) | (pairs.rejected_seq < pairs.prompt + pairs.rejected)
            ).sum()
        ),
        identical=int(pairs.identical.sum()),
        empty_responses=int(((pairs.chosen == 0) | (pairs.rejected == 0)).sum()),
        max_length=pairs.max_length,
        truncation_mode=pairs.truncation_mode,
        shuffle=shuffle,
        seed=seed,
        pad_to_multiple_of=pad_to_multiple_of,
        max_row_tokens=max_row_tokens,
        pad_rows_to_multiple_of=pad_rows_to_multiple_of,
        spliced_checked=pairs.spliced_checked,
    )


def estimate_savings(
    dataset,
    tokenizer,
    batch_size: int = 8,
    max_length: int | None = 1024,
    max_row_tokens: int | None = None,
    truncation_mode: str = "keep_start",
    pad_to_multiple_of: int | None = None,
    pad_rows_to_multiple_of: int | None = None,
    shuffle: bool = True,
    seed: int = 42,
    progress: bool = False,
    exact_tokenization: bool = False,
) -> SavingsEstimate:
    """Tokens stock TRL's DPOTrainer would run on `dataset` in one epoch vs `PrefixSharedDPOTrainer`.

    `dataset`: a `datasets.Dataset`, a list of example dicts, or a file / hub name; `tokenizer`: a tokenizer or its
    name / directory. The other arguments mean what the `DPOConfig` / `PrefixSharedDPOConfig` fields of the same
    names mean (`batch_size` is `per_device_train_batch_size`; `seed` is `seed`, or `data_seed` when set).
    """
    if isinstance(dataset, str | Path):
        dataset = load_preference_dataset(str(dataset))
    if isinstance(tokenizer, str | Path):
        tokenizer = load_tokenizer(str(tokenizer))
    pairs = tokenize_pairs(dataset, tokenizer, max_length, truncation_mode, progress, exact_tokenization)
    return count_tokens(pairs, batch_size, shuffle, seed, pad_to_multiple_of, max_row_tokens, pad_rows_to_multiple_of)
