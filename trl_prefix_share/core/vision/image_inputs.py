"""The image tensors of a stock vision preference batch, cut per example.

TRL's ``DataCollatorForVisionPreference`` processes ``[examples' images] * 2`` (chosen rows, then rejected rows), so
the first half of every image tensor already holds each example's images once. The processors lay those tensors out
in one of two ways: one entry per image (LLaVA, LLaVA-NeXT, Gemma 3: ``pixel_values``, ``image_sizes``), or one row
per patch with a grid per image (the Qwen-VL family: ``pixel_values`` with ``image_grid_thw``). Anything else is
refused by name rather than guessed.
"""

from __future__ import annotations

import hashlib

import torch

#: Per-token text inputs of the stock batch (everything else that is a tensor belongs to the images).
TEXT_KEYS = frozenset({"input_ids", "attention_mask", "completion_mask", "token_type_ids", "mm_token_type_ids"})
#: Keys a vision preference batch may carry that are neither text nor image inputs.
OTHER_KEYS = frozenset({"ref_chosen_logps", "ref_rejected_logps"})
VIDEO_KEYS = ("pixel_values_videos", "video_grid_thw")
#: TRL's image columns: a list of images per example, or a single image.
IMAGE_COLUMNS = ("image", "images")


def has_image_column(column_names) -> bool:
    """Whether a dataset with these columns is image data (TRL's ``_is_vision_dataset`` rule)."""
    return any(column in IMAGE_COLUMNS for column in column_names or ())


class UnsupportedImageInputs(ValueError):
    """The processor produced image tensors whose layout per image is unknown."""


def image_tensors(batch: dict) -> dict[str, torch.Tensor]:
    """The batch's image inputs (the tensors the processor added besides the text)."""
    videos = [key for key in VIDEO_KEYS if key in batch]
    if videos:
        raise UnsupportedImageInputs(
            f"The batch holds video inputs {videos}; prefix sharing serves image preference data only. Use "
            "`DPOTrainer` for video data."
        )
    return {
        key: value
        for key, value in batch.items()
        if torch.is_tensor(value) and key not in TEXT_KEYS and key not in OTHER_KEYS
    }


def _image_ranges(images_per_example: list[int]) -> list[tuple[int, int]]:
    starts = torch.tensor([0, *images_per_example]).cumsum(0).tolist()
    return list(zip(starts[:-1], starts[1:], strict=True))


def _rows_per_image(key: str, value: torch.Tensor, tensors: dict[str, torch.Tensor], total_images: int):
    """How many leading rows of ``value`` each image owns (``None``: one each)."""
    if key == "pixel_values" and "image_grid_thw" in tensors:
        return tensors["image_grid_thw"].prod(-1)
    if value.size(0) == total_images:
        return None
    raise UnsupportedImageInputs(
        f"The processor's `{key}` has {value.size(0)} rows for {total_images} images (chosen and rejected "
        "together); prefix sharing knows one row per image, or one row per patch with `image_grid_thw`. Use "
        "`DPOTrainer` for this processor."
    )


def select_examples(
    tensors: dict[str, torch.Tensor], images_per_example: list[int], examples: list[int]
) -> dict[str, torch.Tensor]:
    """The image tensors of ``examples`` (indices into the batch's examples), in that order, each image once."""
    total = 2 * sum(images_per_example)
    ranges = _image_ranges(images_per_example)
    wanted = [image for example in examples for image in range(*ranges[example])]
    chosen_images = torch.tensor(wanted, dtype=torch.long)
    selected = {}
    for key, value in tensors.items():
        per_image = _rows_per_image(key, value, tensors, total)
        if per_image is None:
            selected[key] = value.index_select(0, chosen_images)
            continue
        starts = per_image.cumsum(0) - per_image
        rows = [torch.arange(int(starts[i]), int(starts[i] + per_image[i])) for i in wanted]
        selected[key] = value.index_select(0, torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long))
    return selected


def example_fingerprints(tensors: dict[str, torch.Tensor], images_per_example: list[int]) -> list[str]:
    """A digest of each example's processed images ("" without images): equal digests mean equal image inputs."""
    prints = []
    for example, count in enumerate(images_per_example):
        if count == 0:
            prints.append("")
            continue
        digest = hashlib.sha1()
        for key, value in sorted(select_examples(tensors, images_per_example, [example]).items()):
            digest.update(key.encode())
            digest.update(str(tuple(value.shape)).encode())
            digest.update(value.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        prints.append(digest.hexdigest())
    return prints
