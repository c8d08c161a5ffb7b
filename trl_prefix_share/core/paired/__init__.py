"""ORPO / CPO (SimPO, AlphaPO): the layout of their stacked `[chosen; rejected]` batch and the reductions of
the per-token log-probs to what their `concatenated_forward` returns."""
