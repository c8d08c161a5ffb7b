"""The vision preference collator: TRL's own processed batch plus a packed layout whose prompts carry their images.

TRL's ``DataCollatorForVisionPreference`` stays in charge of the chat template, image processing, padding and
truncation. On top of it this adds the packed layout (prompt tokens and images once per pair), the images' fingerprints
in each sequence's prompt identity (so equal text over different images is never shared), and the placement of each
image feature in the packed rows (``placement.py``).
"""

from __future__ import annotations

from typing import Any

from trl_prefix_share.core.packing import PACKED_KEY
from trl_prefix_share.core.preference.collator import PrefixSharedPreferenceCollator, pair_documents
from trl_prefix_share.core.vision.image_inputs import example_fingerprints, image_tensors
from trl_prefix_share.core.vision.placement import VISION_KEY, place_images


def images_per_example(examples: list[dict[str, Any]]) -> list[int]:
    """How many images each example holds (TRL's ``images`` list, or a single ``image``)."""
    counts = []
    for example in examples:
        if "images" in example:
            counts.append(len(example["images"] or []))
        else:
            counts.append(0 if example.get("image") is None else 1)
    return counts


class PrefixSharedVisionPreferenceCollator(PrefixSharedPreferenceCollator):
    """Wraps TRL's ``DataCollatorForVisionPreference``; adds ``batch["prefix_share"]`` with the images placed.

    Args (beyond ``PrefixSharedPreferenceCollator``'s):
        image_token_id: the model's image placeholder token (its config's ``image_token_id``).
    """

    needs_source_index = True
    #: One-level documents only: the same placeholder tokens stand for other images in other examples, and the
    #: per-token inputs of a node come from its owner's rows (see ``core/tree_support.py``).
    merges_documents = False

    def __init__(self, *args: Any, image_token_id: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.image_token_id = image_token_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        counts = images_per_example(examples)  # before TRL's collator turns `image` into `images`
        batch = self.base_collator(examples)
        tensors = image_tensors(batch)
        # Pairs keep one example's chosen and rejected rows together (same images by construction); only documents
        # that may join examples need the images in the prompt identity.
        joins_examples = self.group_documents is not pair_documents
        prints = example_fingerprints(tensors, counts) if tensors and joins_examples else None
        packed = self.pack(batch, prompt_images=prints)
        if tensors:
            packed[VISION_KEY] = place_images(packed, batch["input_ids"], self.image_token_id, counts, tensors)
        batch[PACKED_KEY] = packed
        return batch
