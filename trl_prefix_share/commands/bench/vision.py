"""The vision benchmark's data and model: the generated charts-and-shapes set and a Qwen2.5-VL-shaped model built
offline from a config, with its processor made from the shared tokenizer (no download, no torchvision).

Qwen2.5-VL-3B's proportions at CPU scale: patch 14 with 2x2 merging (so a 336x336 image gives 576 patches and 144
image tokens), a windowed vision tower with full attention in its last block, and a Qwen2 text body with GQA.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedModel

from trl_prefix_share.commands.image_preferences import image_preference_dataset

#: Short names of generated image preference sets.
VISION_DATASETS = ("shapes",)
QWEN_VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
#: A chat template that handles TRL's multimodal messages: an image entry becomes Qwen's image placeholder.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def is_vision_dataset(name: str) -> bool:
    return name in VISION_DATASETS


def offline_processor_class(base: type) -> type:
    """A Qwen-VL processor class that accepts ``video_processor=None``: its video processor needs torchvision, and
    image preference data never uses it. Saving writes the tokenizer and the image processor."""

    class OfflineProcessor(base):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

        def save_pretrained(self, save_directory, **kwargs):
            self.tokenizer.save_pretrained(save_directory)
            self.image_processor.save_pretrained(save_directory)
            return []

    OfflineProcessor.__name__ = base.__name__
    return OfflineProcessor


def qwen_vl_processor(
    tokenizer_dir: str, processor_cls: type | None = None, patch_size: int = 14, max_pixels: int = 336 * 336
):
    """A Qwen-VL processor from a text tokenizer: the vision tokens added, PIL image processing, no videos."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_VISION_TOKENS})
    images = Qwen2VLImageProcessorPil(
        patch_size=patch_size,
        temporal_patch_size=2,
        merge_size=2,
        min_pixels=(4 * patch_size) ** 2,
        max_pixels=max_pixels,
    )
    return offline_processor_class(processor_cls or Qwen2_5_VLProcessor)(
        image_processor=images, tokenizer=tokenizer, video_processor=None, chat_template=QWEN_CHAT_TEMPLATE
    )


def qwen_vl_token_ids(tokenizer: Any) -> dict[str, int]:
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )


@dataclass(frozen=True)
class VisionShape:
    """Sizes of the benchmark's Qwen2.5-VL-shaped model."""

    layers: int = 8
    hidden: int = 512
    heads: int = 8
    kv_heads: int = 2
    intermediate: int = 1536
    vision_depth: int = 4
    vision_hidden: int = 256
    vision_heads: int = 4
    image_size: int = 336

    def describe(self) -> str:
        return (
            f"qwen2_5_vl {self.layers}x{self.hidden} text, {self.vision_depth}x{self.vision_hidden} vision tower, "
            f"{self.image_size}px images"
        )


def build_vision_model(shape: VisionShape, processor: Any, seed: int, dtype: torch.dtype) -> PreTrainedModel:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = processor.tokenizer
    half = shape.hidden // shape.heads // 2  # rotary pairs per head, split as Qwen2.5-VL does (16:24:24 of 64)
    temporal = half // 4
    spatial = (half - temporal) // 2
    config = Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=shape.hidden,
            intermediate_size=shape.intermediate,
            num_hidden_layers=shape.layers,
            num_attention_heads=shape.heads,
            num_key_value_heads=shape.kv_heads,
            vocab_size=len(tokenizer),
            tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": [half - 2 * spatial, spatial, spatial],
            },
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        vision_config=dict(
            depth=shape.vision_depth,
            hidden_size=shape.vision_hidden,
            intermediate_size=4 * shape.vision_hidden,
            num_heads=shape.vision_heads,
            out_hidden_size=shape.hidden,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[shape.vision_depth - 1],
        ),
        tie_word_embeddings=True,
        **qwen_vl_token_ids(tokenizer),
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).to(dtype)


def build_vision_model_dir(shape: VisionShape, processor: Any, seed: int, dtype: torch.dtype) -> str:
    """Save the model (and the processor's tokenizer) to a temporary directory, loaded by path like a user's model."""
    path = tempfile.mkdtemp(prefix="trl-prefix-share-bench-vlm-")
    build_vision_model(shape, processor, seed, dtype).save_pretrained(path)
    processor.save_pretrained(path)
    return path


def vision_rows(name: str, count: int, seed: int, shape: VisionShape):
    """``count`` examples of the generated set ``name`` (chat messages, one image each)."""
    if name != "shapes":
        raise ValueError(f"Unknown generated image set {name!r}; choose from {', '.join(VISION_DATASETS)}.")
    return image_preference_dataset(count, seed=seed, image_size=shape.image_size, conversational=True)


class ImageCounter:
    """Counts the images the vision tower encodes, on the policy and the reference alike (wraps their
    ``get_image_features``)."""

    def __init__(self) -> None:
        self.images = 0

    def watch(self, model: torch.nn.Module | None) -> None:
        from trl_prefix_share.core.vision.model_kinds import multimodal_backbone

        if model is None or not hasattr(model, "get_image_features"):
            return
        backbone = multimodal_backbone(getattr(model, "get_base_model", lambda: model)())
        original = backbone.get_image_features

        def counting(*args: Any, **kwargs: Any):
            grid = kwargs.get("image_grid_thw", args[1] if len(args) > 1 else None)
            pixels = kwargs.get("pixel_values", args[0] if args else None)
            self.images += int(grid.size(0)) if grid is not None else int(pixels.size(0))
            return original(*args, **kwargs)

        backbone.get_image_features = counting
