"""The vision part of the packed forward (model side): images encoded once, features, positions and token types
gathered into the packed rows.

TRL calls the model with its stock batch: ``input_ids``/``attention_mask`` of ``[chosen rows; rejected rows]``, the
images processed twice (``pixel_values`` and friends), and per-token ``token_type_ids`` / ``mm_token_type_ids``.
Here:
- the vision tower runs once on the images the packed rows need (``placement.py``), and each packed image token gets
  the feature row of the stock token it was copied from, handed to the model as ``mm_encoder_outputs``;
- multimodal RoPE positions are computed by the model's own ``compute_3d_position_ids`` on the stock batch and
  gathered, so every branch gets the positions of its own unpacked sequence;
- the other per-token stock inputs are gathered the same way; with Gemma 3's bidirectional attention inside an image
  the image blocks of the packed rows are handed to the attention kernels through the layout.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from trl_prefix_share.core.attention.packed_layout import PackedAttentionLayout
from trl_prefix_share.core.vision.model_kinds import VisionSupport, multimodal_backbone
from trl_prefix_share.core.vision.placement import VISION_KEY


def gather_per_token(values: torch.Tensor, source_index: torch.Tensor, fill: int = 0) -> torch.Tensor:
    """``values[..., N, L]`` of the stock batch at the packed rows' source tokens -> ``[..., rows, T]``."""
    flat = values.reshape(*values.shape[:-2], -1)
    picked = flat[..., source_index.clamp(min=0).reshape(-1)]
    picked = picked.masked_fill(source_index.reshape(-1) < 0, fill)
    return picked.view(*values.shape[:-2], *source_index.shape)


def _flat_features(features: Any) -> torch.Tensor:
    """One ``[tokens, hidden]`` tensor of a model's image features (a tuple per image, or one tensor)."""
    if isinstance(features, (tuple, list)):
        features = torch.cat(list(features), dim=0)
    return features.reshape(-1, features.shape[-1])


def encode_images_once(backbone: torch.nn.Module, vision: dict[str, Any]) -> Any:
    """The vision tower's output for the needed images, its per-token features reordered to the packed image tokens.

    The output object is the model's own (``pooler_output`` and, for Qwen3-VL, ``deepstack_features``), so its forward
    merges it exactly as it merges features it computed itself.
    """
    outputs = backbone.get_image_features(**vision["image_inputs"], return_dict=True)
    index = vision["feature_index"]
    features = _flat_features(outputs.pooler_output)
    if features.size(0) != vision["num_features"]:
        raise ValueError(
            f"Image features and image tokens do not match: the images give {features.size(0)} feature rows for "
            f"{vision['num_features']} image tokens. `max_length` may cut the image tokens of a prompt: raise it "
            "(or set it to None)."
        )
    as_tuple = isinstance(outputs.pooler_output, (tuple, list))
    placed = features.index_select(0, index)
    outputs.pooler_output = (placed,) if as_tuple else placed
    deepstack = getattr(outputs, "deepstack_features", None)
    if deepstack:
        outputs.deepstack_features = [(_flat_features(layer).index_select(0, index),) for layer in deepstack]
    return outputs


def _stock_3d_positions(
    backbone: torch.nn.Module, stock: dict[str, Any], input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor | None:
    """The multimodal positions the model computes for the stock batch, as its own forward would."""
    compute = backbone.compute_3d_position_ids
    accepted = inspect.signature(compute).parameters
    arguments = {name: stock.get(name) for name in accepted if name not in ("self", "input_ids", "attention_mask")}
    arguments.update(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=None, cache=None)
    return compute(**{name: value for name, value in arguments.items() if name in accepted})


def image_blocks(token_types: torch.Tensor, layout: PackedAttentionLayout) -> torch.Tensor:
    """Gemma 3's bidirectional blocks in the packed rows: one id per run of image tokens, -1 elsewhere.

    A run must lie inside one segment (a shared prefix or a branch); stock's run ids restart per row, so ids here are
    only compared for equality (same run)."""
    is_image = token_types == 1
    previous = torch.nn.functional.pad(is_image, (1, 0), value=False)[:, :-1]
    branches = layout.branch_ids.to(token_types.device)
    segment = layout.document_ids.to(token_types.device) * (int(branches.max()) + 2) + branches
    previous_segment = torch.nn.functional.pad(segment, (1, 0), value=-1)[:, :-1]
    if bool((is_image & previous & (segment != previous_segment)).any()):
        raise NotImplementedError(
            "An image's tokens run across a branch boundary (a prompt that ends inside an image) in a model that "
            "attends bidirectionally inside images; this layout cannot reproduce that. Use `DPOTrainer`."
        )
    starts = is_image & ~previous
    run = starts.reshape(-1).cumsum(0).view(is_image.shape) - 1
    return torch.where(is_image, run, -1)


def vision_model_inputs(
    model: torch.nn.Module,
    support: VisionSupport,
    packed: dict[str, Any],
    stock: dict[str, Any],
    stock_input_ids: torch.Tensor,
    stock_attention_mask: torch.Tensor | None,
    layout: PackedAttentionLayout,
) -> dict[str, Any]:
    """Keyword arguments of the packed forward for a vision-language model; removes the stock image inputs from
    ``stock`` (the forward's remaining keyword arguments)."""
    backbone = multimodal_backbone(model)
    vision = packed.get(VISION_KEY)
    source_index = packed["source_index"]
    extra: dict[str, Any] = {}
    if support.multimodal_rope:  # the same for the policy and the reference forward: computed once per step
        positions = layout.cached(
            "multimodal_positions",
            lambda: _stock_3d_positions(backbone, stock, stock_input_ids, stock_attention_mask),
        )
        if positions is not None:
            extra["position_ids"] = gather_per_token(positions, source_index)
    for key in list(vision["image_inputs"]) if vision is not None else ():
        stock.pop(key, None)  # the stock batch's images (each twice): replaced by the images encoded once
    for key in list(stock):
        if torch.is_tensor(stock[key]) and tuple(stock[key].shape) == tuple(stock_input_ids.shape):
            extra[key] = gather_per_token(stock.pop(key), source_index)  # token types of the stock rows
    if vision is not None:
        extra["mm_encoder_outputs"] = {"image": encode_images_once(backbone, vision)}
    if support.bidirectional_images and "token_type_ids" in extra:  # once per step, like the masks built from it
        layout.image_blocks = layout.cached("image_blocks", lambda: image_blocks(extra["token_type_ids"], layout))
    return extra
