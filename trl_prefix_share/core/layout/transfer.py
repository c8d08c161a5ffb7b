"""Moving a packed layout between devices."""

from __future__ import annotations

import torch


def move_to_device(value, device: torch.device):
    """A packed layout (nested dicts and lists of tensors) on ``device``."""
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, dict):
        return {key: move_to_device(item, device) for key, item in value.items()}
    if isinstance(value, list):
        return [move_to_device(item, device) for item in value]
    return value
