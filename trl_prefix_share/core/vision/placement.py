"""Where each image feature goes in the packed rows (collator side, CPU, once per batch).

The model merges image features by order: the k-th image placeholder token of the batch receives the k-th feature
row. In the packed rows a shared prompt holds its image tokens once, so the features the stock batch computes twice
(chosen and rejected rows) are computed once, for the examples whose image tokens the packed rows hold, and each
packed image token is given the feature row of the stock token it was copied from (``source_index``). This is exact
token by token, whatever the document layout (shared, unshared, grouped by prompt, an image token heading a branch).
"""

from __future__ import annotations

from typing import Any

import torch

from trl_prefix_share.core.vision.image_inputs import select_examples

VISION_KEY = "vision"


def _check_pairs(image_mask: torch.Tensor, images_per_example: list[int]) -> None:
    """Chosen row b and rejected row B + b hold one prompt: their image tokens must sit at the same places."""
    half = image_mask.size(0) // 2
    differ = (image_mask[:half] != image_mask[half:]).any(dim=1).nonzero().flatten().tolist()
    if differ:
        raise ValueError(
            f"Examples {differ} of the batch hold their image tokens at different places in the chosen and rejected "
            "rows, so they do not share one prompt. Check the dataset's prompts and the processor's chat template."
        )
    counts = image_mask[:half].sum(dim=1).tolist()
    lost = [b for b, (count, images) in enumerate(zip(counts, images_per_example, strict=True)) if images and not count]
    stray = [
        b for b, (count, images) in enumerate(zip(counts, images_per_example, strict=True)) if count and not images
    ]
    if lost:
        raise ValueError(
            f"Examples {lost} of the batch have images but no image token is left in their rows: `max_length` cut "
            "them off. Raise `max_length` (or set it to None) so the prompt with its image tokens fits."
        )
    if stray:
        raise ValueError(
            f"Examples {stray} of the batch have image placeholder tokens in their text but no image. Remove the "
            "placeholder from the text or add the image."
        )


def place_images(
    packed: dict[str, Any],
    stock_input_ids: torch.Tensor,
    image_token_id: int,
    images_per_example: list[int],
    tensors: dict[str, torch.Tensor],
) -> dict[str, Any]:
    """The packed batch's image inputs: each needed example's images once, and for every packed image token (in
    row-major order) the row of its feature among those images' features.

    Returns ``image_inputs`` (the image tensors of the needed examples, named as the processor named them),
    ``num_images`` (how many images those are), ``feature_index`` and ``num_features`` (the feature rows those images
    must give: checked in the forward).
    """
    rows, length = stock_input_ids.shape
    half = rows // 2
    image_mask = stock_input_ids == image_token_id
    _check_pairs(image_mask, images_per_example)
    packed_ids = packed["input_ids"].reshape(-1)
    source = packed["source_index"].reshape(-1)
    in_packed = (packed_ids == image_token_id) & (source >= 0)
    source = source[in_packed]
    source_row, source_column = source // length, source % length
    example = source_row % half  # a rejected row's image tokens are its chosen row's (checked above)
    needed = torch.unique(example)  # sorted: the images are processed in batch order
    slot = torch.full((half,), -1, dtype=torch.long)
    slot[needed] = torch.arange(needed.numel())
    needed_mask = image_mask[needed]
    rank = (needed_mask.reshape(-1).cumsum(0) - 1).view(needed_mask.shape)
    examples = needed.tolist()
    return {
        "image_inputs": select_examples(tensors, images_per_example, examples),
        "num_images": sum(images_per_example[b] for b in examples),
        "feature_index": rank[slot[example], source_column],
        "num_features": int(needed_mask.sum()),
    }
