"""Batching and counting: the tokens stock TRL's padded batches and our packed rows hold over one epoch."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from trl_prefix_share.commands.estimate.loading import load_preference_dataset, load_tokenizer
from trl_prefix_share.commands.estimate.memory import (
    ModelSizes,
    StepSizes,
    estimate_memory,
    side_key_slots,
    stock_steps,
)
from trl_prefix_share.commands.estimate.results import LengthStats, PairLengths, SavingsEstimate
from trl_prefix_share.commands.estimate.tokenization import tokenize_pairs
from trl_prefix_share.commands.estimate.work import compute_limit
from trl_prefix_share.core.layout import assign_rows
from trl_prefix_share.core.layout.tree import MIN_SHARED_TOKENS


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


#: One laid-out sequence as the counts see it: (tokens, prompt tokens as `prompt_bytes`).
Laid = tuple[int, bytes]


def tree_tokens(documents: list[list[Laid]], min_shared_tokens: int = MIN_SHARED_TOKENS) -> int:
    """Tokens of one row's prefix trees (``layout.tree``) for its documents' laid-out sequences.

    The trie of the row's distinct prompts, walked over their sorted list (prompts that agree on their first tokens
    are a contiguous run of it; its common length is that of its first and last prompt). A node of several prompts
    is laid out once when it holds ``min_shared_tokens`` tokens or would otherwise part a document's sequences, else
    its tokens go to each child; a prompt's own sequences share it (all but its last token) when there are several;
    every other token is a sequence's own. Python runs per node, never per token."""
    by_prompt: dict[bytes, list[tuple[int, int]]] = {}
    for document, sequences in enumerate(documents):
        for length, prompt in sequences:
            by_prompt.setdefault(prompt, []).append((length, document))
    prompts = sorted(by_prompt)
    total = 0
    # (first, stop) of a run of `prompts`, the first index it lays out, and whether a node above it was laid out.
    pending: list[tuple[int, int, int, bool]] = [(0, len(prompts), 0, False)]
    while pending:
        first, stop, start, rooted = pending.pop()
        if stop - first == 1:
            lengths = [length for length, _ in by_prompt[prompts[first]]]
            total += _one_prompt_tokens(len(prompts[first]) // 4, lengths, start, rooted)
            continue
        agreed = len(os.path.commonprefix([prompts[first], prompts[stop - 1]])) // 4
        runs, leaves = _children(prompts, first, stop, agreed)
        documents_of = [{doc for index in range(a, b) for _, doc in by_prompt[prompts[index]]} for a, b in runs]
        documents_of += [{doc} for index in leaves for _, doc in by_prompt[prompts[index]]]
        parts_a_document = sum(map(len, documents_of)) > len(set().union(*documents_of))
        if (rooted or agreed >= 2) and (agreed - 1 - start >= min_shared_tokens or parts_a_document):
            total += agreed - 1 - start
            start, rooted = agreed - 1, True
        total += sum(length - start for index in leaves for length, _ in by_prompt[prompts[index]])
        pending.extend((a, b, start, rooted) for a, b in runs)
    return total


def _one_prompt_tokens(prompt: int, lengths: list[int], start: int, rooted: bool) -> int:
    """Tokens from ``start`` on of the sequences of one prompt (``prompt`` tokens): its head once for several."""
    if len(lengths) == 1 or (not rooted and prompt < 2):
        return sum(length - start for length in lengths)
    return prompt - 1 - start + sum(length - (prompt - 1) for length in lengths)


def _children(prompts: list[bytes], first: int, stop: int, agreed: int) -> tuple[list[tuple[int, int]], list[int]]:
    """The children of the node of ``prompts[first:stop]`` (agreeing on ``agreed`` tokens): runs of prompts with the
    same next token, and the prompts that end there (each of their sequences a leaf)."""
    runs, leaves, index = [], [], first
    while index < stop:
        if len(prompts[index]) // 4 == agreed:
            leaves.append(index)
            index += 1
            continue
        head, end = prompts[index][: 4 * (agreed + 1)], index + 1
        while end < stop and prompts[end].startswith(head):
            end += 1
        runs.append((index, end))
        index = end
    return runs, leaves


def _packed_tokens(
    document_sizes: list[int],
    documents: list[list[Laid]],
    max_row_tokens: int | None,
    pad_rows_to_multiple_of: int | None,
    prefix_tree: bool,
    min_shared_tokens: int = MIN_SHARED_TOKENS,
) -> int:
    """Tokens of one batch's packed rows (`pack_documents`): rows x the longest row, rounded up. Rows are filled by
    one-level document sizes; with ``prefix_tree`` a row holds the prefix trees of its documents' sequences."""
    rows = assign_rows(document_sizes, max_row_tokens)
    if prefix_tree:
        longest = max(tree_tokens([documents[index] for index in row], min_shared_tokens) for row in rows)
    else:
        longest = max(sum(document_sizes[index] for index in row) for row in rows)
    return len(rows) * int(_round_up(np.int64(longest), pad_rows_to_multiple_of))


def _pair_documents(pairs: PairLengths, batch: np.ndarray) -> tuple[list[int], list[list[Laid]]]:
    """A batch's documents as the DPO collator builds them: one per pair (identical chosen/rejected laid out once)."""
    sizes = [int(pairs.document[index]) for index in batch]
    if pairs.prompt_tokens is None:
        return sizes, [[] for _ in sizes]
    laid_out = []
    for index in batch:
        chosen, rejected = pairs.prompt_tokens[index]
        sequences = [(int(pairs.chosen_seq[index]), chosen)]
        if not pairs.identical[index]:
            sequences.append((int(pairs.rejected_seq[index]), rejected))
        laid_out.append(sequences)
    return sizes, laid_out


def _one_level_size(sequences: list[Laid]) -> int:
    """Tokens of one document whose sequences all have the same prompt (`GroupByPrompt`): the prompt's head once."""
    prompt = len(sequences[0][1]) // 4
    head = prompt - 1 if prompt >= 2 else 0
    return head + sum(length - head for length, _ in sequences)


def _grouped_documents(
    pairs: PairLengths, batch: np.ndarray, max_row_tokens: int | None
) -> tuple[list[int], list[list[Laid]]]:
    """A batch's documents under `group_by_prompt` (`core.preference.prompt_groups.GroupByPrompt`), from the stock
    batch's sequences in its order (chosen rows, then rejected rows): those with the same (truncated) prompt tokens
    one document, in order of first appearance, cut into consecutive parts that fit ``max_row_tokens``; a part lays
    out each distinct sequence once."""
    groups: dict[bytes, list[tuple[bytes, Laid]]] = {}
    for side, lengths in enumerate((pairs.chosen_seq, pairs.rejected_seq)):
        for index in batch:
            prompt = pairs.prompt_tokens[index][side]
            groups.setdefault(prompt, []).append((pairs.sequence_digests[index][side], (int(lengths[index]), prompt)))
    documents: list[list[Laid]] = []
    for members in groups.values():
        part: dict[bytes, Laid] = {}
        for digest, sequence in members:
            grown = {**part, digest: sequence}
            if part and max_row_tokens is not None and _one_level_size(list(grown.values())) > max_row_tokens:
                documents.append(list(part.values()))
                grown = {digest: sequence}
            part = grown
        documents.append(list(part.values()))
    return [_one_level_size(document) for document in documents], documents


def _batch_order(pairs: PairLengths, batch_size: int, shuffle: bool, seed: int, group_by_prompt: bool) -> np.ndarray:
    """The first epoch's order of our trainer: the seeded shuffle, or the prompt-grouped sampler's batches."""
    if not group_by_prompt:
        return sampler_order(len(pairs), shuffle, seed)
    from trl_prefix_share.trainers.dpo.grouping import PromptGroupedSampler

    batches = PromptGroupedSampler(pairs.prompt_keys, batch_size=batch_size, seed=seed).batches(0)
    return np.array([index for batch in batches for index in batch], dtype=np.int64)


def _stock_shapes(
    pairs: PairLengths, order: np.ndarray, batch_size: int, multiple: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """(rows, width) of stock TRL's padded ``[2B, L]`` batches, consecutive slices of ``order``."""
    if not len(order):
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    starts = np.arange(0, len(order), batch_size)
    longest = np.maximum(pairs.chosen_seq, pairs.rejected_seq)[order]
    sizes = np.diff(np.append(starts, len(order)))
    return 2 * sizes, _round_up(np.maximum.reduceat(longest, starts), multiple)


def _stock_batches(pairs: PairLengths, order: np.ndarray, batch_size: int, multiple: int | None) -> np.ndarray:
    """Tokens of stock TRL's padded ``[2B, L]`` batches, consecutive slices of ``order``."""
    rows, widths = _stock_shapes(pairs, order, batch_size, multiple)
    return rows * widths


def document_groups(documents: list[list[Laid]]) -> list[tuple[int, list[int]]]:
    """Each one-level document as (its shared prompt's tokens, its sequences' tokens after it), for `compute_limit`:
    prefix trees share more, so the limit read off one-level documents is the lower one."""
    groups = []
    for document in documents:
        if document:
            prompt = min(len(tokens) // 4 for _, tokens in document)
            groups.append((prompt, [length - prompt for length, _ in document]))
    return groups


def _scored_positions(pairs: PairLengths, batch: np.ndarray, documents: list[list[Laid]], grouped: bool) -> int:
    """Positions our head scores in a batch: the response tokens of each sequence laid out (a distinct sequence
    once under `group_by_prompt`; identical chosen / rejected once)."""
    if grouped:
        return sum(length - len(prompt) // 4 for document in documents for length, prompt in document)
    both = pairs.chosen_seq[batch] + pairs.rejected_seq[batch] - pairs.prompt_seq[batch]
    return int(np.where(pairs.identical[batch], both // 2, both).sum())


def count_tokens(
    pairs: PairLengths,
    batch_size: int = 8,
    shuffle: bool = True,
    seed: int = 42,
    pad_to_multiple_of: int | None = None,
    max_row_tokens: int | None = None,
    pad_rows_to_multiple_of: int | None = None,
    prefix_tree: bool = True,
    group_by_prompt: bool = False,
    prefix_tree_min_shared_tokens: int = MIN_SHARED_TOKENS,
    model: ModelSizes | None = None,
) -> SavingsEstimate:
    """Sum stock and prefix-shared tokens over the batches of one epoch (the last batch may be short, as in TRL);
    with ``model`` (its sizes), also predict the peak memory of a step of each (`estimate.memory`);
    ``prefix_tree``: our rows hold prefix trees (the trainers' default; ``prefix_tree_min_shared_tokens`` as the
    config field), else one-level documents;
    ``group_by_prompt``: ours is `PrefixSharedDPOConfig(group_by_prompt=True)` (its sampler and documents), stock
    keeps its own shuffled order."""
    if group_by_prompt and (pairs.prompt_keys is None or pairs.sequence_digests is None):
        raise ValueError("group_by_prompt needs pairs from `tokenize_pairs` (their prompt keys and digests)")
    stock_order = sampler_order(len(pairs), shuffle, seed)
    order = _batch_order(pairs, batch_size, shuffle, seed, group_by_prompt)
    stock_rows, stock_widths = _stock_shapes(pairs, stock_order, batch_size, pad_to_multiple_of)
    stock_batches = stock_rows * stock_widths
    trees = prefix_tree and pairs.prompt_tokens is not None
    ours_batches, one_level_batches, ours_steps, groups = [], [], [], []
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        if group_by_prompt:
            sizes, documents = _grouped_documents(pairs, batch, max_row_tokens)
        else:
            sizes, documents = _pair_documents(pairs, batch)
        one_level = _packed_tokens(sizes, documents, max_row_tokens, pad_rows_to_multiple_of, prefix_tree=False)
        one_level_batches.append(one_level)
        if trees:
            ours_batches.append(
                _packed_tokens(
                    sizes, documents, max_row_tokens, pad_rows_to_multiple_of, True, prefix_tree_min_shared_tokens
                )
            )
        else:
            ours_batches.append(one_level)
        if model is not None:
            side = side_key_slots([[length for length, _ in document] for document in documents])
            scored = _scored_positions(pairs, batch, documents, group_by_prompt)
            ours_steps.append(StepSizes(ours_batches[-1], scored, side))
            groups += document_groups(documents)
    ours = np.asarray(ours_batches, dtype=np.int64)
    memory = None
    if model is not None:
        memory = estimate_memory(model, stock_steps(stock_rows, stock_widths), ours_steps)
    # Per step, as the trainer logs it: stock's padding of the batch ours trains on.
    same_batches = _stock_batches(pairs, order, batch_size, pad_to_multiple_of) if group_by_prompt else stock_batches
    ratios = same_batches / ours if len(ours) else []
    unpadded = int(pairs.chosen_seq.sum() + pairs.rejected_seq.sum())
    return SavingsEstimate(
        examples=len(pairs),
        batch_size=batch_size,
        batches=len(ours_batches),
        stock_tokens=int(stock_batches.sum()),
        unpadded_tokens=unpadded,
        tokens=int(ours.sum()),
        one_level_tokens=int(sum(one_level_batches)),
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
        group_by_prompt=group_by_prompt,
        memory=memory,
        compute_limit=compute_limit(model, groups) if model is not None and groups else None,
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
    group_by_prompt: bool = False,
    prefix_tree_min_shared_tokens: int = MIN_SHARED_TOKENS,
    model: ModelSizes | str | None = None,
) -> SavingsEstimate:
    """Tokens stock TRL's DPOTrainer would run on `dataset` in one epoch vs `PrefixSharedDPOTrainer`, and with
    ``model`` (its sizes, or a hub name / directory whose config is read) the peak memory of a step of each.

    `dataset`: a `datasets.Dataset`, a list of example dicts, or a file / hub name; `tokenizer`: a tokenizer or its
    name / directory. The other arguments mean what the `DPOConfig` / `PrefixSharedDPOConfig` fields of the same
    names mean (`batch_size` is `per_device_train_batch_size`; `seed` is `seed`, or `data_seed` when set).
    """
    if isinstance(dataset, str | Path):
        dataset = load_preference_dataset(str(dataset))
    if isinstance(tokenizer, str | Path):
        tokenizer = load_tokenizer(str(tokenizer))
    pairs = tokenize_pairs(dataset, tokenizer, max_length, truncation_mode, progress, exact_tokenization)
    if isinstance(model, str | Path):
        model = ModelSizes.from_pretrained(str(model))
    return count_tokens(
        pairs,
        batch_size,
        shuffle,
        seed,
        pad_to_multiple_of,
        max_row_tokens,
        pad_rows_to_multiple_of,
        group_by_prompt=group_by_prompt,
        prefix_tree_min_shared_tokens=prefix_tree_min_shared_tokens,
        model=model,
    )
