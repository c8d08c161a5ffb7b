"""Each attention layer's sliding window, as the packed kernels read it.

The structural check (``model_structure``) stamps every attention module with its window, read from the config the
way transformers builds its masks; the kernels read that stamp, never a keyword alone: some models (Qwen2-MoE,
PhiMoE) apply their window only through the mask, which a packed forward does not build.
"""

from __future__ import annotations

import torch

#: The attribute the structural check stamps on each attention module: its window (None: full attention).
WINDOW_ATTRIBUTE = "prefix_share_window"
_UNSET = object()


def positive_window(value) -> int | None:
    """A window size, or None for 'no window' (transformers writes 0 or None for that)."""
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def layer_window(module: torch.nn.Module, keyword: int | None) -> int | None:
    """The window of the layer calling attention: the stamped one; a keyword that disagrees is refused."""
    stamped = getattr(module, WINDOW_ATTRIBUTE, _UNSET)
    if stamped is _UNSET:  # a module we did not stamp (no layer index): the keyword or its own attribute
        return positive_window(keyword) or positive_window(getattr(module, "sliding_window", None))
    if keyword is not None and positive_window(keyword) != stamped:
        raise NotImplementedError(
            f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}) passes sliding_window={keyword} "
            f"to its attention, but its config gives {stamped}: its window cannot be determined."
        )
    return stamped
