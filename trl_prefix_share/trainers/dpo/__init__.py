"""DPO: `PrefixSharedDPOTrainer` on `trl.DPOTrainer`, its config, prompt- and length-grouped batches, token budgets."""
