"""A stand-in for transformers' cache that hands a mixer its initial states and keeps its final ones.

transformers 5.x mixers (short convolutions, Mamba2, gated delta rules) read and write their states through one cache
interface (`get_conv_state`, `update_conv_state`, `get_recurrent_state`, `update_recurrent_state`) and continue a
multi-token forward from a cached state: the convolution sees the cached inputs to its left, the scan starts from the
cached recurrent state. Passing this object as the mixer's ``cache`` therefore runs the model's own layer code (and its
kernels) from any state we choose. Unlike the real cache it copies nothing in place, so autograd follows every state
from the prefix into the branches.
"""

from __future__ import annotations

import torch


class StateCarrier:
    """Initial states in, final states out, for one mixer call over a batch of segments.

    Attributes:
        initial_conv / initial_recurrent: ``state_idx -> tensor`` handed to the mixer (absent: a zero state).
        conv_inputs: ``state_idx -> (inputs, kernel)``, everything the convolution saw (initial columns included).
        final_recurrent: ``state_idx -> tensor``, the recurrent state the mixer wrote at the end of the call.
    """

    def __init__(
        self,
        initial_conv: dict[int, torch.Tensor] | None = None,
        initial_recurrent: dict[int, torch.Tensor] | None = None,
    ) -> None:
        self.initial_conv = initial_conv or {}
        self.initial_recurrent = initial_recurrent or {}
        self.conv_inputs: dict[int, tuple[torch.Tensor, int]] = {}
        self.final_recurrent: dict[int, torch.Tensor] = {}

    # -- the cache interface the mixers call -------------------------------------------------------------------------

    def get_conv_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor | None:
        return self.initial_conv.get(state_idx)

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor | None:
        return self.initial_recurrent.get(state_idx)

    def update_conv_state(
        self, conv_states: torch.Tensor, layer_idx: int, state_idx: int = 0, conv_kernel_size: int | None = None, **_
    ) -> torch.Tensor:
        """Return the inputs the convolution must see: the initial columns, then this call's inputs."""
        if conv_kernel_size is None:
            raise NotImplementedError("The mixer did not pass `conv_kernel_size` with its convolution inputs.")
        initial = self.initial_conv.get(state_idx)
        full = conv_states if initial is None else torch.cat([initial.to(conv_states.dtype), conv_states], dim=-1)
        self.conv_inputs[state_idx] = (full, int(conv_kernel_size))
        return full

    def update_recurrent_state(self, recurrent_states: torch.Tensor, layer_idx: int, state_idx: int = 0, **_):
        self.final_recurrent[state_idx] = recurrent_states
        return recurrent_states

    def is_recording_past(self, layer_idx: int) -> bool:
        """True: a one-token call must take the general path (``update_conv_state``), not the in-place decode
        update of a cached convolution state (transformers >= 5.25 takes that path only when not recording)."""
        return True

    def get_recurrent_states_to_keep(self, layer_idx: int | None = None) -> int:
        """No intermediate states: only the final one of each call is handed on."""
        return 0

    # -- what the segmented run reads back ---------------------------------------------------------------------------

    def final_states(self) -> dict[tuple[str, int], torch.Tensor]:
        """The state at the end of every segment of an unpadded call: the last ``kernel`` convolution inputs (zeros to
        the left of a segment shorter than the kernel) and the recurrent state."""
        states: dict[tuple[str, int], torch.Tensor] = {}
        for state_idx, (inputs, kernel) in self.conv_inputs.items():
            if inputs.size(-1) < kernel:
                inputs = torch.nn.functional.pad(inputs, (kernel - inputs.size(-1), 0))
            states[("conv", state_idx)] = inputs[..., -kernel:]
        for state_idx, state in self.final_recurrent.items():
            states[("recurrent", state_idx)] = state
        return states
