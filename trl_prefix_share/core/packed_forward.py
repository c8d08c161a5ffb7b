"""The shared-prefix forward, installed on top of TRL's fused-LM-head forward.

TRL's trainers call ``model(**batch, labels=labels, fused_lm_head=True)`` on the padded stock batch. When the batch
carries a packed layout (``prefix_share=...``), this forward runs the packed rows instead, scores only labelled
positions, and returns the per-token fields scattered back into the stock ``[2B, L-1]`` layout, so TRL's own loss
and metric code runs unchanged on them.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch
import trl.trainer.utils as trl_utils
from trl.trainer.utils import FusedCausalLMOutput

from trl_prefix_share.core.attention import layout_for_batch, packed_forward_scope
from trl_prefix_share.core.mixers.segmented import check_mixers_ran, restore_segmented_mixers
from trl_prefix_share.core.packing import PACKED_KEY
from trl_prefix_share.core.vision.forward import vision_model_inputs
from trl_prefix_share.core.vision.model_kinds import is_vision_language, vision_support
from trl_prefix_share.core.vision.placement import VISION_KEY

PER_TOKEN_FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
_MARK = "_prefix_share_forward"


@contextlib.contextmanager
def score_labelled_positions_only():
    """Make TRL's fused head project only labelled positions on every device.

    TRL does so on Triton devices and scores every position elsewhere (to keep shapes static for compilers); in a
    packed row most positions are prompt tokens, so scoring them all would waste most of the LM-head work.
    """
    original = getattr(trl_utils, "_use_triton", None)
    if original is None:  # a TRL without this switch: every position is scored, still exact
        yield
        return
    trl_utils._use_triton = lambda device: True
    try:
        yield
    finally:
        trl_utils._use_triton = original


def scatter_to_virtual(values: torch.Tensor, packed: dict[str, Any], virtual_shape: tuple[int, int]) -> torch.Tensor:
    """Move per-token values of labelled packed positions to their place in the shifted stock layout."""
    picked = values.reshape(-1)[packed["label_index"]]
    rows, width = virtual_shape
    out = values.new_zeros(rows * width)
    return out.index_copy(0, packed["target_index"], picked).view(rows, width)


def _config_requests_router_logits(model: torch.nn.Module) -> bool:
    """TRL's fused head asks for router logits (and the aux loss) whenever the config says `output_router_logits`."""
    return bool(getattr(model.config.get_text_config(), "output_router_logits", False))


def install_packed_forward(model: torch.nn.Module, kernel: str) -> None:
    """Wrap ``model.forward`` (already patched by ``trl.trainer.utils.add_fused_lm_head``) once."""
    inner = model.forward
    if getattr(inner, _MARK, False):
        return
    vision = vision_support(model) if is_vision_language(model) else None

    @functools.wraps(inner)
    def forward(*args: Any, **kwargs: Any):
        packed = kwargs.pop(PACKED_KEY, None)
        if packed is None or not kwargs.get("fused_lm_head", False):
            # No layout, or logits requested (deprecated compute_metrics path): the stock padded forward.
            return inner(*args, **kwargs)
        if args:
            raise TypeError("The prefix-shared forward takes keyword arguments only.")
        virtual_ids = kwargs.pop("input_ids")
        stock_attention_mask = kwargs.pop("attention_mask", None)
        for name in ("labels", "position_ids", "inputs_embeds", "shift_labels"):
            kwargs.pop(name, None)
        layout = layout_for_batch(packed, kernel)
        mixers = restore_segmented_mixers(model)  # a re-kernelizing train() / eval() may have dropped them
        extra: dict[str, Any] = {}
        if VISION_KEY in packed and (vision is None or not vision.served):
            reason = "it is not a vision-language model" if vision is None else vision.reason
            raise RuntimeError(f"Prefix sharing cannot serve image inputs for this model: {reason}.")
        if vision is not None and "source_index" in packed:  # a batch of TRL's vision collator
            extra = vision_model_inputs(model, vision, packed, kwargs, virtual_ids, stock_attention_mask, layout)
        if kwargs.get("output_router_logits") or _config_requests_router_logits(model):
            # TRL's head computes the MoE load-balancing loss as a mean over the tokens its `attention_mask` marks.
            # Weighing each packed token by the stock rows holding it gives the stock batch's mean exactly (a shared
            # prompt token stands for all its rows; row padding weighs 0). The mask itself builds no attention mask
            # during a packed forward (see `attention.prefix_share_mask`).
            kwargs["attention_mask"] = packed["token_weights"]
        with packed_forward_scope(), score_labelled_positions_only():
            outputs = inner(
                input_ids=packed["input_ids"],
                position_ids=extra.pop("position_ids", packed["position_ids"]),
                shift_labels=packed["shift_labels"],
                prefix_share_layout=layout,
                **extra,
                **kwargs,
            )
        if layout.layer_calls == 0 and layout.mixer_calls == 0:
            raise RuntimeError(
                f"{type(model).__name__} did not pass the packed layout to its attention layers, so the packed "
                "forward would be plain causal attention. This architecture cannot be served by prefix sharing."
            )
        check_mixers_ran(model, layout, mixers)
        virtual_shape = (virtual_ids.size(0), virtual_ids.size(1) - 1)
        fields = {
            name: None
            if getattr(outputs, name) is None
            else scatter_to_virtual(getattr(outputs, name), packed, virtual_shape)
            for name in PER_TOKEN_FIELDS
        }
        label_mask = torch.zeros(virtual_shape[0] * virtual_shape[1], dtype=torch.bool, device=virtual_ids.device)
        label_mask[packed["target_index"]] = True
        label_mask = label_mask.view(virtual_shape)
        loss = -fields["log_probs"].sum() / label_mask.sum().clamp(min=1)
        return FusedCausalLMOutput(loss=loss, label_mask=label_mask, aux_loss=outputs.aux_loss, **fields)

    setattr(forward, _MARK, True)
    model.forward = forward
