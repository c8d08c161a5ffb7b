"""The trainers layer: one sub-package per TRL trainer family, each a thin subclass that hooks the core into TRL.

`dpo` (DPO, grouped DPO, their config, samplers and validation), `reward` (reward models, ranked lists), `paired`
(ORPO and CPO/SimPO from `trl.experimental`), `online` (GRPO and RLOO: one prompt, G completions), `stepwise`
(stepwise DPO on top of the DPO trainer). Imports `core` only.
"""
