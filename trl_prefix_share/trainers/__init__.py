"""The trainers layer: one sub-package per TRL trainer family, each a thin subclass that hooks the core into TRL.

Every trainer is wired the same way, by `wiring.PrefixSharingMixin` (options before TRL's `__init__`; switch, probe
or exact fallback, and the collator after it); a family states only its switch, its collator, its forward hook and
its validation. `dpo` (DPO, grouped DPO, their config, samplers and validation), `reward` (reward models, ranked
lists), `paired` (ORPO and CPO/SimPO from `trl.experimental`), `online` (GRPO and RLOO: one prompt, G completions),
`stepwise` (stepwise DPO on top of the DPO trainer). Imports `core` only.
"""
