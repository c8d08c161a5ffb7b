"""Several pairs with one prompt: one document per prompt in a batch, and a sampler that batches them together.

Preference sets often hold several pairs per prompt (binarized UltraFeedback, PandaLM, pairwise comparisons of K
models). ``GroupByPrompt`` lays out all sequences of a batch whose prompt tokens are identical as one document: the
prompt once, one branch per distinct response (a response that appears in several pairs is scored once, from one
branch). Each pair's log-probabilities, hence its loss, are exactly those of the pair fed alone.

That only helps when such pairs land in the same batch. ``PromptGroupedSampler`` orders the data so that they do,
while staying shuffled and seeded. It changes which examples share a batch (not the examples seen per epoch), so it is
opt-in; the DPO trainer that uses both is ``grouped_dpo_trainer.GroupedPrefixSharedDPOTrainer``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Hashable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Sampler

from trl_prefix_share.core.preference.prompt_groups import GroupByPrompt, prompt_key

__all__ = ["GroupByPrompt", "PromptGroupedSampler", "prompt_grouped_sampler", "prompt_key", "vision_prompt_keys"]


class PromptGroupedSampler(Sampler[int]):
    """A shuffled, seeded order of dataset indices in which examples with the same prompt fill the same batch.

    Each epoch: the examples of each prompt are shuffled, prompts larger than a batch are cut into batch-sized chunks,
    chunks are taken in a shuffled order and packed into batches best-fit (largest first), and the full batches are
    shuffled. Batches left incomplete go last, the only place where a prompt may straddle a batch boundary. Every index
    appears once per epoch and the DataLoader still cuts fixed-size batches, so epoch length, gradient accumulation and
    distributed sharding (whole batches per process) are unchanged.

    Args:
        keys: one hashable prompt key per example (e.g. the tuple of its prompt token ids).
        batch_size: per-device batch size of the DataLoader this sampler feeds.
        seed: base seed; epoch ``e`` uses ``seed + e`` (call ``set_epoch``, as the Trainer does).
    """

    def __init__(self, keys: Sequence[Hashable], batch_size: int, seed: int = 0) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        groups: dict[Hashable, list[int]] = {}
        for index, key in enumerate(keys):
            groups.setdefault(key, []).append(index)
        self.groups = list(groups.values())
        self.num_examples = len(keys)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_examples

    def __iter__(self) -> Iterator[int]:
        for batch in self.batches(self.epoch):
            yield from batch

    def batches(self, epoch: int) -> list[list[int]]:
        """The batches of an epoch, in order (all full except possibly the last ones)."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        size = self.batch_size
        chunks = []
        for group in self.groups:
            shuffled = [group[i] for i in torch.randperm(len(group), generator=generator).tolist()]
            chunks.extend(shuffled[start : start + size] for start in range(0, len(shuffled), size))
        chunks = [chunks[i] for i in torch.randperm(len(chunks), generator=generator).tolist()]
        chunks.sort(key=len, reverse=True)  # stable: equal sizes keep their shuffled order
        full, open_bins = self._pack(chunks)
        partial = [index for bins in open_bins for b in bins for index in b]
        full = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
        return full + [partial[start : start + size] for start in range(0, len(partial), size)]

    def _pack(self, chunks: list[list[int]]) -> tuple[list[list[int]], list[list[list[int]]]]:
        """Best-fit packing of chunks (largest first) into batches: the full ones, and the open ones by free space."""
        size = self.batch_size
        full: list[list[int]] = []
        open_bins: list[list[list[int]]] = [[] for _ in range(size)]  # open_bins[free]: batches with `free` slots
        for chunk in chunks:
            free = next((f for f in range(len(chunk), size) if open_bins[f]), None)
            batch = open_bins[free].pop() if free is not None else []
            batch.extend(chunk)
            left = size - len(batch)
            if left == 0:
                full.append(batch)
            else:
                open_bins[left].append(batch)
        return full, open_bins


def prompt_grouped_sampler(dataset, batch_size: int, seed: int) -> PromptGroupedSampler:
    """The sampler of a tokenized DPO dataset (``prompt_ids`` column), keyed by the prompt's token ids."""
    keys = [tuple(ids) for ids in dataset["prompt_ids"]]
    return PromptGroupedSampler(keys, batch_size=batch_size, seed=seed)


def _image_digest(image: Any) -> str:
    """A digest of a decoded image's pixels, size and mode (the same picture loaded twice gives the same digest)."""
    digest = hashlib.sha1(f"{image.mode}{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def vision_prompt_keys(dataset) -> list[tuple[str, tuple[str, ...]]]:
    """Prompt keys of an untokenized image dataset: the prompt (text or messages) and its images' digests.

    Equal text over different images must not be grouped: the images are part of the key. Decodes each image once.
    """
    column = "images" if "images" in dataset.column_names else "image"
    keys = []
    for row in dataset.select_columns(["prompt", column]):
        images = row[column] if column == "images" else [row[column]]
        prompt = json.dumps(row["prompt"], sort_keys=True, ensure_ascii=False)
        keys.append((prompt, tuple(_image_digest(image) for image in images or [] if image is not None)))
    return keys
