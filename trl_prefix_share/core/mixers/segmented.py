"""Running a state-carrying mixer's own forward over the segments of a packed layout.

Installed per mixer module when a model is switched. Outside a packed forward the mixer runs untouched (padded
batches, ``generate`` with its cache). During one, the mixer is called once per group of equal-length shared prefixes
(zero initial state) and once for all branches, each branch given the final state of its own prefix through a
`StateCarrier`; the outputs are put back in their packed places. The segments are built once per step and cached on
the layout, so every mixer layer and the reference forward share them.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from trl_prefix_share.core.attention import is_packed_forward_active
from trl_prefix_share.core.attention.packed_layout import PackedAttentionLayout
from trl_prefix_share.core.mixers.kinds import left_padding_keeps_zero_state, mixer_verdict
from trl_prefix_share.core.mixers.segments import MixerSegments, SegmentBatch, build_segments
from trl_prefix_share.core.mixers.state_carrier import StateCarrier

_MARK = "_prefix_share_segmented"
LAYOUT_KEYWORD = "prefix_share_layout"


def segments_of(layout: PackedAttentionLayout, device: torch.device) -> MixerSegments:
    """The layout's mixer segments, built on the first mixer call of a step."""
    return layout.cached(
        ("mixer_segments", str(device)), lambda: build_segments(layout.document_ids, layout.branch_ids).to(device)
    )


def _stack_states(per_group: list[dict[tuple[str, int], torch.Tensor]]) -> dict[tuple[str, int], torch.Tensor]:
    """Final states of all prefix groups in one table per state, with a zero state in row 0."""
    if not per_group:
        return {}
    keys = per_group[0].keys()
    if any(group.keys() != keys for group in per_group):
        raise RuntimeError("A mixer wrote different states for different prefix groups.")
    tables = {}
    for key in keys:
        first = per_group[0][key]
        tables[key] = torch.cat([first.new_zeros((1, *first.shape[1:]))] + [group[key] for group in per_group])
    return tables


def _run_prefixes_left_padded(mixer_forward, flat: torch.Tensor, prefixes: SegmentBatch, **kwargs: Any):
    """All prefixes in one call, left-padded with zeroed inputs and the padding mask (see
    `kinds.left_padding_keeps_zero_state`): each ends in the last slot, so the final states are its own."""
    mask = prefixes.valid
    carrier = StateCarrier()
    inputs = flat[prefixes.index] * mask[..., None].to(flat.dtype)
    out = mixer_forward(inputs, cache=carrier, attention_mask=mask.long(), **kwargs)
    states = carrier.final_states()
    for (kind, index), state in list(states.items()):
        if kind == "conv":  # columns left of a short prefix are padding: zero, as a zero initial state
            width = state.size(-1)
            padded = torch.nn.functional.pad(mask, (width, 0))[:, -width:]
            states[(kind, index)] = state * padded[:, None, :].to(state.dtype)
    valid = mask.reshape(-1)
    return out.reshape(-1, out.size(-1))[valid], prefixes.index.reshape(-1)[valid], states


def run_segmented(
    mixer_forward,
    hidden_states: torch.Tensor,
    segments: MixerSegments,
    left_pad_prefixes: bool = False,
    **kwargs: Any,
) -> torch.Tensor:
    """The mixer's output for every packed position, each run seeing exactly its own sequence's past."""
    flat = hidden_states.reshape(-1, hidden_states.size(-1))
    outputs, places, final_states = [], [], []
    if left_pad_prefixes and segments.prefixes_left_padded is not None:
        out, place, states = _run_prefixes_left_padded(mixer_forward, flat, segments.prefixes_left_padded, **kwargs)
        outputs.append(out)
        places.append(place)
        final_states.append(states)
    else:
        for group in segments.prefix_groups:
            carrier = StateCarrier()
            out = mixer_forward(flat[group.index], cache=carrier, attention_mask=None, **kwargs)
            outputs.append(out.reshape(-1, out.size(-1)))
            places.append(group.index.reshape(-1))
            final_states.append(carrier.final_states())
    if segments.branches is not None:
        tables = _stack_states(final_states)
        initial = {key: table[segments.branch_parent] for key, table in tables.items()}
        carrier = StateCarrier(
            {index: state for (kind, index), state in initial.items() if kind == "conv"},
            {index: state for (kind, index), state in initial.items() if kind == "recurrent"},
        )
        out = mixer_forward(flat[segments.branches.index], cache=carrier, attention_mask=None, **kwargs)
        valid = segments.branches.valid.reshape(-1)
        outputs.append(out.reshape(-1, out.size(-1))[valid])
        places.append(segments.branches.index.reshape(-1)[valid])
    width = outputs[0].size(-1)
    result = outputs[0].new_zeros(segments.num_tokens, width)
    result = result.index_copy(0, torch.cat(places), torch.cat(outputs))
    return result.view(*hidden_states.shape[:-1], width)


def _segmented_forward(module: torch.nn.Module, original):
    @functools.wraps(original)
    def forward(hidden_states: torch.Tensor | None = None, *args: Any, **kwargs: Any):
        layout = kwargs.pop(LAYOUT_KEYWORD, None)
        if hidden_states is None:
            hidden_states = kwargs.pop("hidden_states")
        if layout is None:
            if is_packed_forward_active():
                raise RuntimeError(
                    f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}) was called without the "
                    "packed layout, so its state would leak across documents and branches."
                )
            return original(hidden_states, *args, **kwargs)
        if args or kwargs.get("cache") is not None or kwargs.get("cache_params") is not None:
            raise RuntimeError(f"{type(module).__name__}: a packed forward takes no cache and no positional inputs.")
        for name in ("cache", "cache_params", "attention_mask"):
            kwargs.pop(name, None)  # the layout replaces the padding mask; MoE token weights are not a mask
        layout.mixer_calls += 1
        segments = segments_of(layout, hidden_states.device)
        left_pad = left_padding_keeps_zero_state(module, mixer_verdict(module))
        return run_segmented(original, hidden_states, segments, left_pad_prefixes=left_pad, **kwargs)

    setattr(forward, _MARK, True)
    return forward


def install_segmented_mixers(model: torch.nn.Module) -> int:
    """Wrap the forward of every served state-carrying mixer of ``model`` (idempotent); returns how many."""
    count = 0
    for module in model.modules():
        verdict = mixer_verdict(module)
        if verdict is None or not verdict.served:
            continue
        if not getattr(module.forward, _MARK, False):
            module.forward = _segmented_forward(module, module.forward)
        count += 1
    return count
