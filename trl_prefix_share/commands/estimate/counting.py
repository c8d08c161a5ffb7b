"""Batching and counting: the tokens stock TRL's padded batches and our packed rows hold over one epoch."""

from __future__ import annotations

import os
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


def tree_tokens(sequences: list[tuple[int, bytes]]) -> int:
    """Tokens of one row's prefix trees (``layout.tree``) for its laid-out sequences ``(length, prompt bytes)``.

    Position j of a sequence is laid out once for every sequence sharing its first j + 2 prompt tokens: the shared
    slots are the distinct prompt prefixes of 2 or more tokens, counted over the sorted prompts as each prompt's
    prefixes less those it has in common with its sorted neighbour; every other position is the sequence's own."""
    prompts = sorted(tokens for _, tokens in sequences)
    shared = sum(max(len(tokens) // 4 - 1, 0) for tokens in prompts)
    for before, after in zip(prompts, prompts[1:], strict=False):
        common = len(os.path.commonprefix([before, after])) // 4
        shared -= max(common - 1, 0)
    own = sum(length - max(len(tokens) // 4 - 1, 0) for length, tokens in sequences)
    return shared + own


def _packed_tokens(
    documents: np.ndarray,
    max_row_tokens: int | None,
    pad_rows_to_multiple_of: int | None,
    sequences: list[list[tuple[int, bytes]]] | None = None,
) -> int:
    """Tokens of one batch's packed rows (`pack_documents`): rows x the longest row, rounded up. Rows are filled by
    one-level document sizes; with ``sequences`` (each document's laid-out sequences) a row holds its prefix trees."""
    rows = assign_rows(documents.tolist(), max_row_tokens)
    if sequences is None:
        longest = max(int(documents[row].sum()) for row in rows)
    else:
        longest = max(tree_tokens([seq for index in row for seq in sequences[index]]) for row in rows)
    return len(rows) * int(_round_up(np.int64(longest), pad_rows_to_multiple_of))


def _laid_out_sequences(pairs: PairLengths, index: int) -> list[tuple[int, bytes]]:
    """A pair's sequences as its document lays them out: one when chosen and rejected are identical."""
    chosen, rejected = pairs.prompt_tokens[index]
    if pairs.identical[index]:
        return [(int(pairs.chosen_seq[index]), chosen)]
    return [(int(pairs.chosen_seq[index]), chosen), (int(pairs.rejected_seq[index]), rejected)]


def count_tokens(
    pairs: PairLengths,
    batch_size: int = 8,
    shuffle: bool = True,
    seed: int = 42,
    pad_to_multiple_of: int | None = None,
    max_row_tokens: int | None = None,
    pad_rows_to_multiple_of: int | None = None,
    prefix_tree: bool = True,
) -> SavingsEstimate:
    """Sum stock and prefix-shared tokens over the batches of one epoch (the last batch may be short, as in TRL);
    ``prefix_tree``: our rows hold prefix trees (the trainers' default), else one-level documents."""
    order = sampler_order(len(pairs), shuffle, seed)
    starts = np.arange(0, len(order), batch_size)
    stock = unpadded = ours = one_level = 0
    ratios = []
    if len(order):
        longest = np.maximum(pairs.chosen_seq, pairs.rejected_seq)[order]
        sizes = np.diff(np.append(starts, len(order)))
        stock_batches = 2 * sizes * _round_up(np.maximum.reduceat(longest, starts), pad_to_multiple_of)
        documents = pairs.document[order]
        one_level_batches = np.array(
            [_packed_tokens(documents[s : s + batch_size], max_row_tokens, pad_rows_to_multiple_of) for s in starts]
        )
        ours_batches = one_level_batches
        if prefix_tree and pairs.prompt_tokens is not None:
            laid_out = [_laid_out_sequences(pairs, int(index)) for index in order]
            ours_batches = np.array(
                [
                    _packed_tokens(
                        documents[s : s + batch_size],
                        max_row_tokens,
                        pad_rows_to_multiple_of,
                        laid_out[s : s + batch_size],
                    )
                    for s in starts
                ]
            )
        stock, ours = int(stock_batches.sum()), int(ours_batches.sum())
        one_level = int(one_level_batches.sum())
        unpadded = int(pairs.chosen_seq.sum() + pairs.rejected_seq.sum())
        ratios = stock_batches / ours_batches
    return SavingsEstimate(
        examples=len(pairs),
        batch_size=batch_size,
        batches=len(starts),
        stock_tokens=stock,
        unpadded_tokens=unpadded,
        tokens=ours,
        one_level_tokens=one_level,
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
