"""The core layer: everything that does not depend on which TRL trainer runs.

The packed layout (`layout`), the collators that add it to TRL's own padded batches (`collator`, `reward_collator`),
one document per prompt (`prompt_groups`), the attention kernels and their registration (`attention`), the packed
forwards that hand per-token results back in TRL's layout (`packed_forward`, `packed_scores`), what a model's layers
are and whether they can be served (`model_structure`), switching a model and probing it (`model_support`), the
options (`options`), the token metrics (`token_metrics`), the installer with its exact fallback (`installer`) and
every TRL / transformers internal the package relies on (`trl_compat`). Nothing here imports `trainers` or
`commands`.
"""
