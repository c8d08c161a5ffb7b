"""DPO preference batches: TRL's padded `[chosen; rejected]` batch plus its packed layout (`collator`), and one
document per distinct prompt (`prompt_groups`: `group_by_prompt` and the construction probe)."""
