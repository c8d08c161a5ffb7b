"""Tiny vision-language models and their processors, built offline from configs and the shared tokenizer.

torchvision is not installed here, so the processors use transformers' PIL image processors; the Qwen processors
also ask for a video processor, and one that takes none is enough for image data. Tiny random models barely look
at the image at default init (Gemma 3's projector starts at zero), so the vision tower and projector weights are
drawn larger: a missing or wrong image then moves the loss visibly (`test_a_wrong_image_moves_the_loss`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from conftest import TOKENIZER_DIR
from transformers import AutoTokenizer, PreTrainedModel, ProcessorMixin

from trl_prefix_share.commands.bench.vision import qwen_vl_processor, qwen_vl_token_ids

#: One chat template for every processor: image entries become the processor's own image placeholder.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}IMAGE_PLACEHOLDER{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def _tokenizer(tokens: list[str]):
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tokenizer.add_special_tokens({"additional_special_tokens": tokens})
    return tokenizer


def _template(placeholder: str) -> str:
    return CHAT_TEMPLATE.replace("IMAGE_PLACEHOLDER", placeholder)


def _qwen_processor(processor_cls: type, patch_size: int):
    """The package's offline Qwen-VL processor (no video processor, PIL images), with small images."""
    processor = qwen_vl_processor(str(TOKENIZER_DIR), processor_cls, patch_size=patch_size, max_pixels=48 * 48)
    return processor, processor.tokenizer


#: The Qwen-VL family's tiny vision tower: 4-pixel patches merged 2 x 2, two blocks of 32.
QWEN_VISION = dict(depth=2, hidden_size=32, num_heads=2, patch_size=4, spatial_merge_size=2, temporal_patch_size=2)
MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}


def _qwen_family(names: tuple[str, str, str], text: dict, vision: dict):
    """A tiny Qwen-VL model (``names``: processor, config and model classes) and its offline processor."""
    import transformers

    processor_cls, config_cls, model_cls = (getattr(transformers, name) for name in names)
    processor, tokenizer = _qwen_processor(processor_cls, patch_size=QWEN_VISION["patch_size"])
    config = config_cls(
        text_config=dict(**TEXT, vocab_size=len(tokenizer), **text),
        vision_config={**QWEN_VISION, **vision},
        **qwen_vl_token_ids(tokenizer),
    )
    return model_cls(config), processor


def qwen2_5_vl():
    return _qwen_family(
        ("Qwen2_5_VLProcessor", "Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration"),
        dict(rope_parameters=MROPE),
        dict(intermediate_size=64, out_hidden_size=32, window_size=16, fullatt_block_indexes=[1]),
    )


def qwen2_vl():
    return _qwen_family(
        ("Qwen2VLProcessor", "Qwen2VLConfig", "Qwen2VLForConditionalGeneration"),
        dict(rope_parameters=MROPE),
        dict(embed_dim=32, mlp_ratio=2),
    )


def qwen3_vl():
    """Qwen3-VL: interleaved multimodal RoPE, and deepstack features added inside the first text layer."""
    return _qwen_family(
        ("Qwen3VLProcessor", "Qwen3VLConfig", "Qwen3VLForConditionalGeneration"),
        dict(head_dim=8, rope_parameters={**MROPE, "mrope_interleaved": True}),
        dict(intermediate_size=64, out_hidden_size=32, num_position_embeddings=144, deepstack_visual_indexes=[0]),
    )


def gemma3():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil, Gemma3Processor

    tokenizer = _tokenizer(["<start_of_image>", "<image_soft_token>", "<end_of_image>"])
    for name, token in (("boi", "<start_of_image>"), ("image", "<image_soft_token>"), ("eoi", "<end_of_image>")):
        setattr(tokenizer, f"{name}_token", token)
        setattr(tokenizer, f"{name}_token_id", tokenizer.convert_tokens_to_ids(token))
    images = Gemma3ImageProcessorPil(size={"height": 32, "width": 32}, do_pan_and_scan=False)
    processor = Gemma3Processor(
        image_processor=images, tokenizer=tokenizer, image_seq_length=16, chat_template=_template("<start_of_image>")
    )
    config = Gemma3Config(
        text_config=dict(
            **TEXT,
            head_dim=8,
            vocab_size=len(tokenizer),
            sliding_window=24,
            layer_types=["sliding_attention", "full_attention"],
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=4,
        ),
        mm_tokens_per_image=16,
        boi_token_index=tokenizer.boi_token_id,
        eoi_token_index=tokenizer.eoi_token_id,
        image_token_index=tokenizer.image_token_id,
    )
    return Gemma3ForConditionalGeneration(config), processor


#: LLaVA and LLaVA-NeXT's tiny CLIP tower: 32 x 32 images in 8 x 8 patches, 16 image tokens (the CLS dropped).
CLIP_VISION = dict(
    model_type="clip_vision_model",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=32,
    patch_size=8,
    projection_dim=32,
)


def _llava_family(processor_cls: type, config_cls: type, model_cls: type, images, **config_fields):
    tokenizer = _tokenizer(["<image>"])
    processor = processor_cls(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=CLIP_VISION["patch_size"],
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=_template("<image>"),
    )
    config = config_cls(
        text_config=dict(model_type="llama", **TEXT, vocab_size=len(tokenizer)),
        vision_config=CLIP_VISION,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        **config_fields,
    )
    return model_cls(config), processor


def llava():
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    images = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return _llava_family(LlavaProcessor, LlavaConfig, LlavaForConditionalGeneration, images)


def llava_next():
    """LLaVA-NeXT: an image cut into tiles of a grid pinpoint plus a base view, with a learned newline per row."""
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    pinpoints = [[32, 64], [64, 32], [64, 64]]
    images = LlavaNextImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints
    )
    return _llava_family(
        LlavaNextProcessor,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        images,
        image_grid_pinpoints=pinpoints,
    )


FAMILIES = {
    "qwen2_vl": qwen2_vl,
    "qwen2_5_vl": qwen2_5_vl,
    "qwen3_vl": qwen3_vl,
    "gemma3": gemma3,
    "llava": llava,
    "llava_next": llava_next,
}


@dataclass
class TinyVisionModel:
    model: PreTrainedModel
    processor: ProcessorMixin


def draw_vision_weights_larger(model: PreTrainedModel, std: float = 0.3, seed: int = 0) -> None:
    """Redraw the vision tower's and projector's weights with a large spread, so the image matters to the loss."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ("visual" in name or "vision" in name or "projector" in name or "mm_" in name) and parameter.ndim >= 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * std)


def build_vision_model(family: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> TinyVisionModel:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, processor = FAMILIES[family]()
    draw_vision_weights_larger(model, seed=seed)
    model.config.get_text_config().pad_token_id = processor.tokenizer.pad_token_id
    return TinyVisionModel(model.to(dtype), processor)


def describe(batch: dict[str, Any]) -> dict[str, tuple]:
    return {key: tuple(value.shape) for key, value in batch.items() if torch.is_tensor(value)}
