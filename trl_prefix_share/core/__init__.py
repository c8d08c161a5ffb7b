"""The core layer: the packed layout, the kernels, the model side, and each trainer family's adapter, with no TRL
trainer class in it.

Shared by every family: the layout (`layout/`: documents, rows, the packed tensors, the CPU kernel's index tensors),
the packing choice that travels to the collator and the model alike (`packing`, resolved from the user's `options`),
the attention kernels and their registration (`attention/`), state-carrying mixers run per segment (`mixers/`), what a
model's layers are (`model_structure`, read with `code_reading`), switching and probing a causal LM
(`model_support`, `packed_forward`), the installer with its exact fallback (`installer`), naming bad examples
(`invalid_examples`), token metrics, the tested releases and every TRL / transformers internal relied on
(`trl_compat`).

One folder per family adapter, each holding its collator (how TRL's stock batch becomes documents) and, where the
family needs one, its forward or probe: `preference/` (DPO; one document per prompt), `paired/` (ORPO / CPO stacked
batches and their reductions), `reward/` (reward batches, the packed score forward), `online/` (GRPO / RLOO
left-padded rows, their position rule and probe), `vision/` (image prompts). Nothing here imports `trainers` or
`commands`.
"""
