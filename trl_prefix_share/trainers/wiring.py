"""The one way a prefix-shared trainer is wired into its TRL trainer.

Every family takes the same steps: read our options off the config before TRL's ``__init__`` (and refuse
prompt-learning adapters before TRL wraps the model), then, once TRL has built its models, resolve the packing choice
for the device, switch and probe the models (or fall back to stock training, exactly), and put its collator around
TRL's. ``PrefixSharingMixin`` takes those steps; a family states only what differs, by overriding the hooks below.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from trl_prefix_share.core.installer import fall_back, install_or_fall_back, model_to_patch, start_prefix_share
from trl_prefix_share.core.options import packing_options
from trl_prefix_share.core.token_metrics import log_batch_token_counts
from trl_prefix_share.core.tree_support import resolve_tree_layout

#: A model-side switch ``enable(model, kernel)`` and its construction probe ``probe(model, kernel, device)``.
Switch = tuple[Callable[[torch.nn.Module, str], None], Callable[..., None]]


class PrefixSharingMixin:
    """Put first in the bases of a TRL trainer. The trainer's ``__init__`` keeps TRL's signature, spelled out so IDEs
    and ``help()`` show TRL's arguments, and wraps TRL's own ``__init__`` in two calls:

        self._start_prefix_share(args, peft_config)
        super().__init__(...)
        self._install_prefix_sharing()

    What a family states (the hooks):
        ``_prefix_share_switch()``: the core's model-side switch and probe for its models (required).
        ``_wrap_collator(models)``: put its collator around TRL's (default: none; online RL packs in its scoring hook).
        ``_prefix_share_refusal()``: a reason to train like stock before anything is switched (default: none).
        ``_prefix_share_models()``: the models to switch (default: the policy under any PEFT wrapper, and the
            reference model when the trainer has one).

    After installation: ``prefix_share_packing`` (the packing choice, ``core.packing.PackingOptions``),
    ``prefix_share_kernel`` (the attention kernel ``auto`` resolved to), ``prefix_share_enabled`` and
    ``prefix_share_fallback`` (the reason when the trainer trains like stock TRL).
    """

    def _start_prefix_share(self, args: Any, peft_config: Any) -> None:
        """The first line of ``__init__``: options (defaults for a plain TRL config), token totals, adapter check."""
        start_prefix_share(self, args, peft_config)
        self._prefix_share_installed = False
        self.prefix_share_enabled = False

    def _install_prefix_sharing(self) -> bool:
        """Switch the models to the packed forward and wrap the collator, once; True when prefix sharing is on.

        Idempotent, so a family may call it early (DPO's reference precompute runs inside TRL's ``__init__``)."""
        if self._prefix_share_installed:
            return self.prefix_share_enabled
        self._prefix_share_installed = True
        self.prefix_share_packing = packing_options(self.prefix_share_args, self.accelerator.device)
        self.prefix_share_kernel = self.prefix_share_packing.kernel
        refusal = self._prefix_share_refusal()
        if refusal is not None:
            fall_back(self, refusal)
            return False
        models = self._prefix_share_models()
        enable, probe = self._prefix_share_switch()
        if install_or_fall_back(self, models, enable, probe, self.prefix_share_kernel):
            self.prefix_share_tree_refusal = resolve_tree_layout(
                self.prefix_share_packing, models, self.prefix_share_args.prefix_tree
            )
            self._wrap_collator(models)
            self.prefix_share_enabled = True
        return self.prefix_share_enabled

    # -- what a family states ----------------------------------------------------------------------------------------

    def _prefix_share_switch(self) -> Switch:
        raise NotImplementedError(f"{type(self).__name__} must say how its models are switched and probed.")

    def _wrap_collator(self, models: list[torch.nn.Module]) -> None:
        """Put this family's collator around ``self.data_collator`` (the models are switched by then)."""

    def _prefix_share_refusal(self) -> str | None:
        """Why this trainer cannot share prefixes whatever the model (it then trains like stock), or None."""
        return None

    def _prefix_share_models(self) -> list[torch.nn.Module]:
        models = [model_to_patch(self.accelerator.unwrap_model(self.model))]
        if getattr(self, "ref_model", None) is not None:
            models.append(self.accelerator.unwrap_model(self.ref_model))
        return models

    # -- shared by the families whose batches carry the layout ------------------------------------------------------

    def _log_token_counts(self, inputs: dict[str, Any]) -> None:
        """Packed vs stock tokens of this batch (shapes only: no device sync); ratio 1.0 in the exact fallback."""
        log_batch_token_counts(self, inputs)
