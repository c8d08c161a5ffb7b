"""`estimate` on image preference data: image tokens counted with the model's processor.

Text estimates tokenize without a model; image tokens depend on the processor (an image's size decides its token
count in the Qwen-VL family), so image data is counted by running TRL's own ``DataCollatorForVisionPreference`` and
our vision collator batch by batch in the sampler's order (CPU image processing, no model): exact token counts of
stock's padded batches and of our packed rows, image tokens included, and the images each side encodes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from trl_prefix_share.commands.estimate.counting import sampler_order
from trl_prefix_share.core.packing import PACKED_KEY, PackingOptions
from trl_prefix_share.core.vision.collator import PrefixSharedVisionPreferenceCollator, images_per_example
from trl_prefix_share.core.vision.image_inputs import has_image_column
from trl_prefix_share.core.vision.placement import VISION_KEY


def has_images(dataset: Any) -> bool:
    return has_image_column(dataset.column_names)


def processor_image_token_id(processor: Any) -> int:
    """The image placeholder token the processor writes (the one the model's config names ``image_token_id``)."""
    tokenizer = processor.tokenizer
    for owner in (tokenizer, processor):
        value = getattr(owner, "image_token_id", None)
        if isinstance(value, int):
            return value
    raise ValueError(f"{type(processor).__name__} names no image token id; prefix sharing cannot place its images.")


@dataclass
class VisionEstimate:
    """Token and image counts over one epoch of image preference batches."""

    batch_size: int
    batches: int
    examples: int
    stock_tokens: int
    packed_tokens: int
    stock_image_tokens: int
    packed_image_tokens: int
    stock_images_encoded: int
    packed_images_encoded: int

    @property
    def token_ratio(self) -> float:
        return self.stock_tokens / max(self.packed_tokens, 1)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "token_ratio": self.token_ratio}


def count_vision_tokens(
    dataset: Any,
    processor: Any,
    batch_size: int = 8,
    max_length: int | None = 1024,
    shuffle: bool = True,
    seed: int = 42,
    options: PackingOptions | None = None,
) -> VisionEstimate:
    """Collate every batch of one epoch as stock TRL and as prefix sharing would, and count (no model step).

    Images are encoded per forward: stock twice per example (chosen and rejected rows), ours once; the policy and
    the reference forward each do so, so the per-step totals are twice these."""
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    tokenizer = processor.tokenizer
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    image_token = processor_image_token_id(processor)
    collator = PrefixSharedVisionPreferenceCollator(
        DataCollatorForVisionPreference(processor=processor, max_length=max_length),
        pad_token_id=pad_token_id,
        options=options or PackingOptions(sdpa_buckets=False),
        image_token_id=image_token,
    )
    order = sampler_order(len(dataset), shuffle, seed).tolist()
    totals = dict.fromkeys(
        ("stock_tokens", "packed_tokens", "stock_image_tokens", "packed_image_tokens", "stock", "packed"), 0
    )
    batches = 0
    for start in range(0, len(order), batch_size):
        examples = [dict(dataset[i]) for i in order[start : start + batch_size]]
        counts = images_per_example(examples)
        batch = collator(examples)
        packed = batch[PACKED_KEY]
        totals["stock_tokens"] += int(batch["input_ids"].numel())
        totals["packed_tokens"] += int(packed["input_ids"].numel())
        totals["stock_image_tokens"] += int((batch["input_ids"] == image_token).sum())
        totals["packed_image_tokens"] += int((packed["input_ids"] == image_token).sum())
        totals["stock"] += 2 * sum(counts)
        vision = packed.get(VISION_KEY)
        totals["packed"] += 0 if vision is None else vision["num_images"]
        batches += 1
    return VisionEstimate(
        batch_size=batch_size,
        batches=batches,
        examples=len(order),
        stock_tokens=totals["stock_tokens"],
        packed_tokens=totals["packed_tokens"],
        stock_image_tokens=totals["stock_image_tokens"],
        packed_image_tokens=totals["packed_image_tokens"],
        stock_images_encoded=totals["stock"],
        packed_images_encoded=totals["packed"],
    )


def format_vision_report(estimates: list[VisionEstimate], title: str) -> str:
    lines = [title, ""]
    for e in estimates:
        lines.append(
            f"batch {e.batch_size}: {e.batches} batches of {e.examples} examples; tokens per epoch stock "
            f"{e.stock_tokens:,} (image tokens {e.stock_image_tokens:,}), prefix sharing {e.packed_tokens:,} (image "
            f"tokens {e.packed_image_tokens:,}): {e.token_ratio:.2f}x fewer; images encoded per forward stock "
            f"{e.stock_images_encoded:,}, prefix sharing {e.packed_images_encoded:,}"
        )
    lines.append(
        "\nTokens include image tokens. Every forward (policy and reference) encodes the images again, so the vision "
        "tower's share of a step shrinks by the same ratio as the images encoded."
    )
    return "\n".join(lines)
