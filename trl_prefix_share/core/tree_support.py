"""Whether a switched model may take prefix-tree layouts, and whether its trees may shift position ids.

Read from what the model is (its modules and config), never from a probe, so it holds under every launcher:

- *Trees* (``PackingOptions.prefix_tree``) need every state-carrying mixer on the unpadded run, whose plan starts a
  node from its parent's state at any depth; a mixer on the padded run serves one-level layouts only. Vision-language
  models keep one-level documents: their per-token inputs (multimodal positions, token types, image features) are
  gathered from each node's owner row, which only a document of identical prompts makes exact.
- *Shifted positions* (``PackingOptions.shift_positions``): online RL left-pads prompts, and stock numbers positions by
  column, so the same system prompt sits at different position ids in different rows. One tree node gives all of them
  one numbering: each sequence's positions move by a constant. That is exact when the model sees positions only
  through their differences: rotary embeddings of a fixed frequency table (rope types ``default``, ``linear``,
  ``llama3``, ``yarn``; ``dynamic`` and ``longrope`` change their table with the absolute length) and no learned
  absolute position embedding. Sliding windows compare positions by difference too. (Exact in exact arithmetic: the
  rotary angles are rounded in float32 at other magnitudes, a float32-rounding-level difference, the same order as
  stock's own between two paddings of one sequence; the equivalence tests bound it that way.)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from trl_prefix_share.core.mixers.ragged import instance_recipe
from trl_prefix_share.core.mixers.segmented import unsegmented_forward
from trl_prefix_share.core.packing import PackingOptions
from trl_prefix_share.core.vision.model_kinds import is_vision_language

#: Rope types whose frequency table does not depend on the sequence length.
STATIC_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn"})
_POSITION_EMBEDDING_NAMES = ("wpe", "embed_positions", "position_embeddings", "pos_embed", "positional_embedding")


def tree_refusal(model: torch.nn.Module) -> str | None:
    """Why ``model`` (already switched) must keep one-level layouts, or None."""
    if is_vision_language(model):
        return "a vision-language model (its per-token inputs come from each document's own rows)"
    for module in model.modules():
        original = unsegmented_forward(module)
        if original is None:
            continue
        recipe = instance_recipe(module, original)
        if isinstance(recipe, str):
            return f"a mixer on the padded run ({recipe})"
    return None


def _rope_types(config) -> set[str]:
    types = set()
    for name in ("rope_parameters", "rope_scaling"):
        value = getattr(config, name, None)
        if not isinstance(value, dict):
            continue
        nested = [v for v in value.values() if isinstance(v, dict)]  # per layer type (Gemma 3)
        for entry in [value, *nested]:
            kind = entry.get("rope_type", entry.get("type"))
            if kind is not None:
                types.add(str(kind))
    return types or {"default"}


def sees_position_differences_only(model: torch.nn.Module) -> bool:
    """True when the model's outputs stay the same if every position id of a sequence moves by one constant."""
    rotary = False
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, torch.nn.Embedding) and any(part in leaf for part in _POSITION_EMBEDDING_NAMES):
            return False
        if "Rotary" in type(module).__name__:
            rotary = True
    if not rotary:
        return False
    config = model.config.get_text_config()
    return _rope_types(config) <= STATIC_ROPE_TYPES


def probe_packing(model: torch.nn.Module, kernel: str) -> PackingOptions:
    """The packing a construction probe checks ``model`` with: the tree layout the trainer will give it."""
    options = PackingOptions(kernel=kernel)
    resolve_tree_layout(options, [model], enabled=True)
    return options


def resolve_tree_layout(options: PackingOptions, models: Iterable[torch.nn.Module], enabled: bool) -> str | None:
    """Set ``options.prefix_tree`` / ``shift_positions`` for these models; returns why trees are off, if they are."""
    models = list(models)
    refusal = next((reason for reason in map(tree_refusal, models) if reason is not None), None)
    if not enabled:
        refusal = "prefix_tree=False"
    options.prefix_tree = refusal is None
    options.shift_positions = options.prefix_tree and all(map(sees_position_differences_only, models))
    return refusal
