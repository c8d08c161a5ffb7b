"""Opt-in length-grouped batches: pairs of similar length share a batch, batch order stays random.

Why: with several processes, a step takes as long as its slowest rank; batches of similar length give every rank a
similar token count. With ``max_row_tokens``, rows also fill more evenly. The batch size (pairs per batch) is
unchanged, so TRL's per-batch mean loss, gradient accumulation and the logged metrics keep their meaning exactly.

How: a seeded permutation is cut into buckets of ``bucket_batches`` batches; each bucket is sorted by length and cut
into batches; then all full batches are shuffled (the last, partial batch stays last, as with a plain sampler). The
trade-off: examples of similar length train together, a mild correlation inside a batch; larger buckets group more
tightly and correlate more. See `docs/choosing_options.md`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class LengthGroupedBatchSampler(Sampler[int]):
    """Yields example indices so that consecutive runs of ``batch_size`` form length-grouped batches.

    Args:
        lengths: one length per example (for DPO: prompt + longer response tokens, what sets stock's padded width).
        batch_size: pairs per batch (the data loader's batch size).
        bucket_batches: batches per sorting bucket.
        seed: seed of the shuffles; epoch ``e`` uses ``seed + e`` (`set_epoch`), like TRL's seeded sampler.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, bucket_batches: int = 64, seed: int = 42) -> None:
        if batch_size < 1 or bucket_batches < 1:
            raise ValueError("batch_size and bucket_batches must be >= 1")
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long)
        self.batch_size = batch_size
        self.bucket_batches = bucket_batches
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        for batch in self.batches(self.epoch):
            yield from batch

    def batches(self, epoch: int) -> list[list[int]]:
        """The batches of one epoch, in training order."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.lengths), generator=generator)
        bucket = self.batch_size * self.bucket_batches
        batches: list[list[int]] = []
        for start in range(0, len(order), bucket):
            members = order[start : start + bucket]
            members = members[torch.argsort(self.lengths[members], stable=True)]
            batches.extend(members[i : i + self.batch_size].tolist() for i in range(0, len(members), self.batch_size))
        full = [b for b in batches if len(b) == self.batch_size]
        partial = [b for b in batches if len(b) < self.batch_size]  # at most one: the end of the last bucket
        return [full[i] for i in torch.randperm(len(full), generator=generator).tolist()] + partial


def preference_lengths(dataset) -> list[int]:
    """Per example of a tokenized TRL preference dataset: prompt + longer response tokens."""
    prompts = dataset["prompt_ids"] if "prompt_ids" in dataset.column_names else None
    chosen, rejected = dataset["chosen_ids"], dataset["rejected_ids"]
    prompt_lengths = [len(p) for p in prompts] if prompts is not None else [0] * len(chosen)
    return [p + max(len(c), len(r)) for p, c, r in zip(prompt_lengths, chosen, rejected, strict=True)]
