"""Every TRL and transformers internal this package relies on, named in one place and checked once at import.

The trainers override or call TRL methods that are not public API, and the attention switch uses transformers'
registries. On a TRL or transformers release where one of them is missing, the package fails at import with one
error naming the supported range and every missing hook, instead of an AttributeError in the middle of a run.
ORPO and CPO live in `trl.experimental` (whose import warns): their hooks are checked when their trainers load, and
GRPO / RLOO hooks when the online trainers load.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

SUPPORTED = "trl>=1.16,<1.17 and transformers>=5.0,<6"


@dataclass(frozen=True)
class Hook:
    """One internal: ``attribute`` of the module or class at ``owner`` (``"module"`` or ``"module:Class"``)."""

    owner: str
    attribute: str
    why: str

    def present(self) -> bool:
        module_name, _, class_name = self.owner.partition(":")
        try:
            owner = importlib.import_module(module_name)
        except ImportError:
            return False
        if class_name:
            owner = getattr(owner, class_name, None)
        return owner is not None and hasattr(owner, self.attribute)


CORE_HOOKS = (
    Hook("transformers", "AttentionInterface", "the packed attention is registered as an implementation"),
    Hook("transformers.masking_utils", "AttentionMaskInterface", "its mask function keeps plain batches correct"),
    Hook("transformers.masking_utils", "sdpa_mask", "the mask of plain batches on a switched model"),
    Hook("transformers.integrations.sdpa_attention", "sdpa_attention_forward", "plain batches on a switched model"),
    Hook("transformers.modeling_utils:PreTrainedModel", "set_attn_implementation", "switching the attention"),
    Hook("transformers.modeling_utils:PreTrainedModel", "_can_set_attn_implementation", "the structural check"),
    Hook("transformers.pytorch_utils", "Conv1D", "GPT-2's linear layer, not counted as a convolution"),
    Hook("trl.trainer.utils", "add_fused_lm_head", "TRL's fused head scores the packed rows"),
    Hook("trl.trainer.utils", "FusedCausalLMOutput", "the per-token output TRL's loss code reads"),
    Hook("trl.trainer.utils", "_use_triton", "scoring only labelled positions on every device"),
    Hook("trl.trainer.dpo_trainer", "DataCollatorForPreference", "DPO's stock padded [chosen; rejected] batch"),
    Hook("trl.trainer.dpo_trainer:DPOTrainer", "_compute_loss", "calls model(..., fused_lm_head=True)"),
    Hook("trl.trainer.dpo_trainer:DPOTrainer", "_precompute_ref_logps", "the switch before the reference pass"),
    Hook("trl.trainer.dpo_trainer:DPOTrainer", "_prepare_dataset", "up-front validation of examples"),
    Hook("trl.trainer.dpo_trainer:DPOTrainer", "get_batch_samples", "token-budget loss weights"),
    Hook("trl.trainer.dpo_trainer:DPOTrainer", "_get_train_sampler", "prompt- and length-grouped batches"),
    Hook("trl.trainer.reward_trainer", "DataCollatorForPreference", "the reward trainer's stock batch"),
    Hook("trl.trainer.reward_trainer:RewardTrainer", "_prepare_dataset", "ranked lists and validation"),
    Hook("trl.trainer.reward_trainer:RewardTrainer", "_set_signature_columns_if_needed", "ranked-list columns"),
)

#: The online trainers' one hook: the per-token log-prob pass of the policy, old-policy and reference forwards.
ONLINE_HOOKS = tuple(
    Hook(f"trl.trainer.{module}:{name}", attribute, why)
    for module, name in (("grpo_trainer", "GRPOTrainer"), ("rloo_trainer", "RLOOTrainer"))
    for attribute, why in (
        ("_get_per_token_logps_and_entropies", "replaced by the packed log-prob pass"),
        ("_compute_loss", "builds the left-padded prompt + completion rows that are packed"),
    )
)

PAIRED_HOOKS = tuple(
    Hook(f"trl.experimental.{kind}:{name}", attribute, why)
    for kind, name in (("orpo", "ORPOTrainer"), ("cpo", "CPOTrainer"))
    for attribute, why in (
        ("concatenated_forward", "replaced by the packed forward"),
        ("concatenated_inputs", "stacks the padded [chosen; rejected] batch that is packed"),
        ("get_batch_loss_metrics", "adds the token metrics"),
    )
)


class IncompatibleVersionError(ImportError):
    """An installed TRL or transformers lacks an internal this package relies on."""


def check_hooks(hooks: tuple[Hook, ...] = CORE_HOOKS) -> None:
    """Raise one error listing every missing hook, with the installed versions and the supported range."""
    missing = [hook for hook in hooks if not hook.present()]
    if not missing:
        return
    import transformers
    import trl

    listed = "; ".join(f"{hook.owner}.{hook.attribute} ({hook.why})" for hook in missing)
    raise IncompatibleVersionError(
        f"trl-prefix-share supports {SUPPORTED}; installed trl {trl.__version__}, transformers "
        f"{transformers.__version__} lack: {listed}. Install a supported version."
    )
