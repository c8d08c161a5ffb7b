"""Opt-in token-budget batches for DPO: as many pairs per batch as fit a token budget, the loss normalised per pair.

Why: a fixed number of pairs per batch gives batches of very different sizes (a batch of long pairs may not fit in
memory while one of short pairs leaves the device idle). With prefix sharing the tokens a batch runs are known up
front (prompt once + both responses), so batches can be cut to a budget instead.

Batches: a seeded permutation is cut into buckets, each bucket is sorted by length and filled greedily up to
`max_batch_tokens` per process (a pair longer than the budget trains alone). With W processes the sorted bucket is
taken W consecutive pairs at a time, one pair per rank, so in every step all ranks hold the same number of pairs of
similar lengths: balanced ranks, and TRL's metric gathers (which need equal shapes) keep working; `n mod W` examples
of an epoch are left out. Which pairs share a batch is drawn once (so every epoch has the same number of steps, which
the Trainer's schedule relies on); the order of the batches is reshuffled every epoch.

Loss: TRL's DPO loss is a mean over the pairs of a batch, and the Trainer averages micro-batches (gradient
accumulation) with equal weights. With a variable number of pairs per micro-batch that would weight pairs unequally,
so each micro-batch's loss is rescaled by ``pairs_in_batch * micro_batches / pairs_in_step`` (per process; every rank
holds the same counts, so DDP's average is then the mean over every pair of the step, as one big batch would be).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from transformers.trainer_pt_utils import BatchRebalanceSampler


class TokenBudgetBatchSampler(BatchRebalanceSampler):
    """A rank-aware batch sampler of token-budget batches.

    It subclasses transformers' `BatchRebalanceSampler` only so that the Trainer passes it to the data loader as its
    `batch_sampler` and keeps accelerate from sharding it again (both recognise that class); none of the parent's
    behaviour is used.

    Args:
        tokens: tokens each example runs in the packed layout (prompt once + both responses).
        lengths: sort key of the buckets (prompt + longer response).
        max_batch_tokens: token budget of one batch.
        bucket_size: examples per sorting bucket.
        seed: seed of the batch composition and of the per-epoch order (`seed + epoch`).
        num_replicas / rank: processes, and this one.
    """

    def __init__(
        self,
        tokens: Sequence[int],
        lengths: Sequence[int],
        max_batch_tokens: int,
        bucket_size: int = 512,
        seed: int = 42,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if max_batch_tokens < 1 or bucket_size < 1:
            raise ValueError("max_batch_tokens and bucket_size must be >= 1")
        if len(tokens) < num_replicas:
            raise ValueError(f"{len(tokens)} example(s) cannot feed {num_replicas} processes.")
        self.tokens = torch.as_tensor(list(tokens), dtype=torch.long)
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long)
        self.max_batch_tokens = max_batch_tokens
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.steps = self._compose(-(-bucket_size // num_replicas) * num_replicas)

    def _compose(self, bucket_size: int) -> list[list[list[int]]]:
        """The batches of every step: ``steps[k][r]`` is rank r's batch of step k (equal sizes across ranks)."""
        world = self.num_replicas
        generator = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(len(self.tokens), generator=generator)
        order = order[: len(order) - len(order) % world]
        steps: list[list[list[int]]] = []
        for start in range(0, len(order), bucket_size):
            members = order[start : start + bucket_size]
            units = members[torch.argsort(self.lengths[members], stable=True)].view(-1, world)  # one pair per rank
            unit_cost = self.tokens[units].amax(dim=1).tolist()  # the costliest rank bounds the step
            current: list[list[int]] = []
            used = 0
            for unit, cost in zip(units.tolist(), unit_cost, strict=True):
                if current and used + cost > self.max_batch_tokens:
                    steps.append([list(batch) for batch in zip(*current, strict=True)])
                    current, used = [], 0
                current.append(unit)
                used += cost
            if current:
                steps.append([list(batch) for batch in zip(*current, strict=True)])
        return steps

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.steps)

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + 1 + self.epoch)
        for step in torch.randperm(len(self.steps), generator=generator).tolist():
            yield self.steps[step][self.rank]


def packed_tokens(dataset) -> list[int]:
    """Per example of a tokenized TRL preference dataset: prompt once + both responses (+1 for the second branch)."""
    prompts = dataset["prompt_ids"]
    return [
        len(p) + len(c) + len(r) + 1
        for p, c, r in zip(prompts, dataset["chosen_ids"], dataset["rejected_ids"], strict=True)
    ]


def pairs_in_batch(batch: dict) -> int:
    """Pairs of a DPO batch (TRL stacks chosen rows, then rejected rows)."""
    return int(batch["input_ids"].size(0)) // 2
