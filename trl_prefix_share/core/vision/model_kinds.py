"""Which vision-language models the packed path serves, read from their code (never from a list of class names).

A served model:
- has ``get_image_features`` and an image placeholder token id in its config;
- merges the features in its forward by ``masked_scatter`` over the placeholder tokens, and accepts precomputed
  features (``mm_encoder_outputs``), so the packed forward can hand it each feature row where its token sits;
- numbers positions either as plain text (LLaVA, Gemma 3) or with multimodal RoPE through
  ``compute_3d_position_ids`` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): the stock batch's 3-D positions are computed by the
  model itself and gathered into the packed rows, so each branch gets the positions of its own unpacked sequence;
- attends plain causally, or bidirectionally inside each image as Gemma 3 does with ``token_type_ids``
  (``get_block_sequence_ids_for_mask``), which the packed kernels reproduce.
Anything else (a prefix-LM prompt such as PaliGemma's, positions computed another way, an unknown merge) is refused
with the reason, and the trainer falls back to stock training or raises, as for text models.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from trl_prefix_share.core.mixers.kinds import forward_source

IMAGE_BLOCK_RULE = "get_block_sequence_ids_for_mask(token_type_ids"


@dataclass(frozen=True)
class VisionSupport:
    """What the packed path needs to know about a vision-language model (``reason`` is "" when served)."""

    reason: str = ""
    image_token_id: int | None = None
    multimodal_rope: bool = False
    bidirectional_images: bool = False

    @property
    def served(self) -> bool:
        return not self.reason


def multimodal_backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose forward merges images into the text (``model.model`` of a ``*ForConditionalGeneration``)."""
    backbone = getattr(model, "base_model", model)
    return getattr(model, "model", model) if backbone is model else backbone


def image_token_id(config) -> int | None:
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


@functools.cache
def _read_forward(backbone_class: type) -> tuple[str, bool]:
    return forward_source(backbone_class), hasattr(backbone_class, "compute_3d_position_ids")


def is_vision_language(model: torch.nn.Module) -> bool:
    """A model with a vision tower (its config has a vision sub-config)."""
    return getattr(model.config, "vision_config", None) is not None


def vision_support(model: torch.nn.Module) -> VisionSupport:
    """The structural check of a vision-language model (run under every launcher, probe or not)."""
    name = type(model).__name__
    if not hasattr(model, "get_image_features"):
        return VisionSupport(f"{name} has no `get_image_features`, so its images cannot be encoded once per pair")
    token = image_token_id(model.config)
    if token is None:
        return VisionSupport(f"{name}'s config names no image placeholder token (`image_token_id`)")
    backbone = multimodal_backbone(model)
    source, rope_3d = _read_forward(type(backbone))
    if "mm_encoder_outputs" not in source or "masked_scatter(" not in source:
        return VisionSupport(
            f"{type(backbone).__name__} does not merge precomputed image features by placeholder "
            "(`mm_encoder_outputs` and `masked_scatter`), so the packed path cannot place them"
        )
    if "get_rope_index(" in source and not rope_3d:
        return VisionSupport(f"{type(backbone).__name__} computes multimodal positions inside its forward")
    bidirectional = IMAGE_BLOCK_RULE in source
    if "token_type_ids" in source.replace("mm_token_type_ids", "") and not bidirectional:
        return VisionSupport(
            f"{type(backbone).__name__} builds its attention mask from `token_type_ids` (a prefix-LM prompt or "
            "another rule the packed layout does not reproduce)"
        )
    if getattr(model.config.get_text_config(), "use_bidirectional_attention", False):
        return VisionSupport(f"{name} attends bidirectionally over whole sequences")
    return VisionSupport(image_token_id=token, multimodal_rope=rope_3d, bidirectional_images=bidirectional)
